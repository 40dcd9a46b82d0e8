"""Accuracy as a function of the number of training images (CLIP-MSM Fig. 2B), inside one job.

The ridge is refitted on nested random subsets of a run's training images (all rows of a chosen image go
together) and scored on the run's test set; test rows never enter a fit or its alpha selection.

    sizes = resolve_sizes([0.1, 0.5, 1.0], n_images=5000)           # fractions or counts -> counts
    curve = training_size_curve(train_x, train_y, train_ids, test_x, test_y, sizes)
    curve["r2"], curve["r"]                                          # (n_sizes, n_voxels)

Each subset is standardised with its own statistics, as train.py does for the whole training split
(``encoders.feature_transform.FeatureTransform.fit``: mean, unbiased std, and the run's robust
``feature_scaling`` — std floor and clip to the subset's range — or plain z-scoring, ``std_floor=None,
clip=False``, for runs trained before it), so the full-size point reproduces a ridge run exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from encoders.feature_transform import FeatureTransform, scaling_options
from encoders.metrics import pearson_r, r2_score
from encoders.ridge import DEFAULT_ALPHAS, RidgeCV

__all__ = ["resolve_sizes", "nested_image_subsets", "standardise", "training_size_curve"]


def resolve_sizes(sizes: Sequence[float | int], n_images: int, min_size: int = 2) -> list[int]:
    """Training-set sizes in images: floats in (0, 1] are fractions of n_images, ints are counts.

    Sorted, unique, each in [min_size, n_images]; ValueError naming a size outside that range.
    """
    out = []
    for s in sizes:
        n = int(round(float(s) * n_images)) if isinstance(s, float) and float(s) <= 1.0 else int(s)
        if not min_size <= n <= n_images:
            raise ValueError(f"training size {s!r} -> {n} images, outside [{min_size}, {n_images}] "
                             f"(the run's training images)")
        out.append(n)
    return sorted(set(out))


def nested_image_subsets(image_ids: np.ndarray, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Nested subsets of the unique image ids: prefixes of one seeded permutation, one per size (sorted ids)."""
    unique = np.unique(np.asarray(image_ids))
    order = np.random.default_rng(seed).permutation(unique)
    return [np.sort(order[:n]) for n in sizes]


def standardise(train: torch.Tensor, *others: torch.Tensor, scaling: dict | None = None,
                blocks: dict | None = None) -> list[torch.Tensor]:
    """The training rows' standardisation (as train.py fits it: ``FeatureTransform.fit`` with ``scaling``
    {std_floor, clip}, default train.yaml's robust one; ``blocks`` {layer: columns} for the floor) applied
    to them and to ``others``: float32 tensors."""
    t = FeatureTransform(train.shape[1]).fit(train, blocks=blocks, **scaling_options(scaling))
    return [t.standardise(x) for x in (train, *others)]


def training_size_curve(train_x: np.ndarray, train_y: np.ndarray, train_ids: np.ndarray, test_x: np.ndarray,
                        test_y: np.ndarray, sizes: Sequence[int], ridge: dict | None = None, seed: int = 0,
                        device: str = "cpu", scaling: dict | None = None, blocks: dict | None = None) -> dict:
    """Per-voxel test R² and r of ridge fits on nested subsets of the training images.

    train_x (n_train_rows, d) raw features, train_y (n_train_rows, n_voxels), train_ids (n_train_rows,) the
    image of each row; test_x (n_test, d), test_y (n_test, n_voxels); sizes: image counts (resolve_sizes).
    ridge: RidgeCV kwargs (alphas, cv, score, shuffle, seed). scaling, blocks: the standardisation's
    (``standardise``; the run's ``feature_scaling``). Returns {"sizes" (n_sizes,), "n_rows"
    (n_sizes,), "r2" (n_sizes, n_voxels), "r" (n_sizes, n_voxels), "best_alphas" (n_sizes, n_voxels)}.
    """
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(train_x) != len(train_y) or len(train_x) != len(train_ids) or len(test_x) != len(test_y):
        raise ValueError(f"rows differ: train_x {train_x.shape}, train_y {train_y.shape}, train_ids "
                         f"{np.shape(train_ids)}, test_x {test_x.shape}, test_y {test_y.shape}")
    kwargs = {"alphas": DEFAULT_ALPHAS, **(ridge or {})}
    if kwargs.get("alphas") is None:
        kwargs["alphas"] = DEFAULT_ALPHAS
    subsets = nested_image_subsets(train_ids, sizes, seed)
    r2, r, alphas, n_rows = [], [], [], []
    for chosen in subsets:
        rows = np.isin(train_ids, chosen)
        z_train, z_test = standardise(torch.from_numpy(train_x[rows]), torch.from_numpy(test_x), scaling=scaling,
                                      blocks=blocks)
        model = RidgeCV(**kwargs, device=device).fit(z_train, torch.as_tensor(train_y[rows]))
        pred = model.predict(z_test)
        r2.append(r2_score(pred, test_y))
        r.append(pearson_r(pred, test_y))
        alphas.append(model.best_alphas_)
        n_rows.append(int(rows.sum()))
    return {"sizes": np.asarray(list(sizes), np.int64), "n_rows": np.asarray(n_rows, np.int64),
            "r2": np.stack(r2), "r": np.stack(r), "best_alphas": np.stack(alphas)}
