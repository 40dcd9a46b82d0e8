"""Which runs of a sweep are compared with which: comparison groups, encoder pairs, readable encoder names.

A *comparison group* is the runs with the same head, dataset and subject; an *encoder* is a backbone with its
layers. Two runs of a group with different encoders form a pair (the report's comparisons, the maps job's
difference maps). Across subjects, the same encoder + head on the same dataset is the same model.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from encoders.run_dir import RunDir


def encoder_key(run: RunDir) -> tuple[str, tuple[str, ...]]:
    """(backbone, layers) of a run."""
    return run.backbone, tuple(str(x) for x in run.info.get("layers", []))


def model_key(run: RunDir) -> tuple[str, tuple[str, ...], str, str]:
    """What makes two runs the same model on different subjects: (backbone, layers, head, dataset)."""
    return (*encoder_key(run), run.head, run.dataset)


def comparison_group(run: RunDir) -> tuple[str, str, str]:
    """The comparison group of a run: (head, dataset, subject)."""
    return run.head, run.dataset, str(run.subject)


def comparison_groups(runs: Sequence[RunDir]) -> dict[tuple[str, str, str], list[RunDir]]:
    """Runs by (head, dataset, subject), in first-seen order."""
    groups: dict[tuple[str, str, str], list[RunDir]] = {}
    for run in runs:
        groups.setdefault(comparison_group(run), []).append(run)
    return groups


def encoder_pairs(group: Sequence[RunDir]) -> list[tuple[RunDir, RunDir]]:
    """Every two runs of a comparison group whose encoders (backbone or layers) differ, in run order."""
    return [(a, b) for a, b in combinations(group, 2) if encoder_key(a) != encoder_key(b)]


def encoder_labels(runs: Sequence[RunDir]) -> dict[str, str]:
    """{run name: encoder name}: the backbone, with its layers where runs of that backbone differ in them."""
    layers: dict[str, set] = {}
    for run in runs:
        layers.setdefault(run.backbone, set()).add(encoder_key(run)[1])
    return {run.name: run.backbone if len(layers[run.backbone]) == 1
            else f"{run.backbone} [{', '.join(encoder_key(run)[1])}]" for run in runs}


def model_labels(runs: Sequence[RunDir]) -> dict[str, str]:
    """{run name: model name}: the encoder name, with the head where the runs use several heads."""
    encoders = encoder_labels(runs)
    heads = {run.head for run in runs}
    return {run.name: encoders[run.name] if len(heads) == 1 else f"{encoders[run.name]} / {run.head}" for run in runs}
