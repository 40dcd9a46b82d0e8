"""Preprocessing on the extraction device: ``BatchTransform`` against the per-image transform and each
library's own transform object, the extraction pipeline with ``preprocess_on=device`` against
``preprocess_on=cpu``, and the prefetch thread's errors and shutdown.

Tolerances. On the CPU the batched transform runs the per-image transform's own torchvision calls on the
batch: asserted identical (``torch.equal``), and so are the features and the cache entry. The CUDA
arithmetic (``float_resize=True``: float32 interpolation in PIL's two passes, each rounded to a uint8
level), run here on the CPU, measured on these photographs (torch 2.14 / torchvision 0.29, AVX-512): against
the per-image transform 1 uint8 level on 0.04-0.32 % of the values, 2 levels on 0.0002 % (bicubic), 0.003
levels on average at most; against the libraries' own transforms (PIL) 1 level on at most 0.13 %, never
more. Asserted with margin: <= 3 levels, under 1 % of the values differing at all, under 0.1 % by more
than 1 level, < 0.02 levels on average.
"""
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.image_stimuli import ImageDataModule, StimulusDataset, collate_images
from datamodules.nod_files import ImageFiles
from encoders.backbones import build_backbone
from encoders.extract import extract_features, iter_features, loader_transform, pixel_record
from encoders.feature_cache import FeatureCache, feature_key
from encoders.preprocess import BatchTransform, ImageTransform, Preprocess, decode_rgb, resize_arithmetic
from tests.test_preprocess import levels, library_cases, photographs

FLOAT_MAX_LEVELS, FLOAT_SHARE_DIFFERENT, FLOAT_SHARE_OVER_ONE, FLOAT_MEAN_LEVELS = 3.0, 1e-2, 1e-3, 0.02
# (width, height): portrait, landscape, square, smaller than the crop (upsampled), odd sizes
JPEG_SIZES = ((90, 120), (120, 90), (100, 100), (50, 40), (77, 61))


def photo_batch() -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """The test photographs (four sizes) as decoded arrays and as the loader's decode-only tensors."""
    arrays = [np.asarray(image) for image in photographs().values()]
    return arrays, [decode_rgb(a) for a in arrays]


def spec_cases() -> dict[str, Preprocess]:
    """The libraries' specs, and the interpolations / modes they do not use."""
    specs = {case: spec for case, (_, spec) in library_cases().items()}
    specs["nearest"] = Preprocess(160, 182, "shortest", "nearest")
    specs["bilinear, no antialias"] = Preprocess(160, 182, "shortest", "bilinear", antialias=False)
    specs["bicubic squash, no antialias"] = Preprocess(160, 160, "squash", "bicubic", antialias=False)
    return specs


# ----------------------------------------------------------------------------- the batched transform


@pytest.mark.parametrize("case", list(spec_cases()))
def test_batch_transform_on_the_cpu_equals_the_per_image_transform(case):
    spec = spec_cases()[case]
    arrays, decoded = photo_batch()
    per_image = torch.stack([ImageTransform.from_preprocess(spec)(a) for a in arrays])
    batched = BatchTransform(spec)(decoded, "cpu")  # a list of four sizes, grouped by size inside
    assert batched.shape == (len(arrays), 3, spec.crop_size, spec.crop_size) and batched.dtype == torch.float32
    assert batched.is_contiguous()
    assert torch.equal(batched, per_image), case
    one_size = torch.stack([decoded[1]] * 3)  # (B, H, W, 3): one resize call for the whole batch
    assert torch.equal(BatchTransform(spec)(one_size), per_image[[1, 1, 1]])
    assert BatchTransform(spec).arithmetic("cpu") == resize_arithmetic(spec, "cpu")


@pytest.mark.parametrize("case", list(library_cases()))
def test_batch_transform_matches_the_library_transform_object(case):
    """Mixed sizes in one batch, against timm's / torchvision's / open_clip's own transform on PIL images,
    with test_preprocess.py's tolerance for the per-image transform (on a CPU the two are identical)."""
    from tests.test_preprocess import MAX_LEVELS, MEAN_LEVELS, SHARE_OVER_ONE

    library, spec = library_cases()[case]
    _, decoded = photo_batch()
    batched = BatchTransform(spec)(decoded, "cpu")
    for k, (label, image) in enumerate(photographs().items()):
        diff = levels(batched[k], library(image), spec.std)
        assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS, (label, float(diff.max()))
        assert (diff > 1.01).float().mean() < SHARE_OVER_ONE, label


@pytest.mark.parametrize("case", list(spec_cases()))
def test_float_resize_the_cuda_arithmetic_is_within_the_tolerance(case):
    """float_resize=True is what runs on CUDA; here on the CPU, against the per-image transform and (for
    the libraries' specs) the library's own transform."""
    spec = spec_cases()[case]
    arrays, decoded = photo_batch()
    transform = BatchTransform(spec, float_resize=True)
    ours = transform(decoded, "cpu")
    expected = "nearest" if spec.interpolation == "nearest" else "float32-separable"
    assert transform.arithmetic("cpu") == expected == resize_arithmetic(spec, "cuda")
    references = {"per-image": torch.stack([ImageTransform.from_preprocess(spec)(a) for a in arrays])}
    if case in library_cases():
        library = library_cases()[case][0]
        references["library"] = torch.stack([library(image) for image in photographs().values()])
    for name, reference in references.items():
        diff = torch.stack([levels(ours[k], reference[k], spec.std) for k in range(len(arrays))])
        assert diff.max() <= FLOAT_MAX_LEVELS, (name, float(diff.max()))
        assert (diff > 0.5).float().mean() < FLOAT_SHARE_DIFFERENT, (name, float((diff > 0.5).float().mean()))
        assert (diff > 1.01).float().mean() < FLOAT_SHARE_OVER_ONE, name
        assert diff.mean() < FLOAT_MEAN_LEVELS, name


def test_float_resize_is_not_one_rounding_of_one_float_pass():
    """The two rounded passes are what keeps the CUDA resize near PIL: a single float32 pass, rounded once,
    is further from the per-image transform on these photographs (the test would catch a regression)."""
    spec = Preprocess(224, 256, "shortest", "bicubic")
    arrays, decoded = photo_batch()
    reference = torch.stack([ImageTransform.from_preprocess(spec)(a) for a in arrays])
    two_passes = BatchTransform(spec, float_resize=True)(decoded, "cpu")

    def one_pass(x):
        x = x.permute(2, 0, 1)[None].float()
        x = torch.nn.functional.interpolate(x, size=spec.resized_shape(*x.shape[-2:]), mode="bicubic",
                                            antialias=True, align_corners=False)
        from torchvision.transforms.v2 import functional as TF
        x = TF.center_crop(x.clamp(0, 255).round(), [spec.crop_size]) / 255
        return TF.normalize(x, list(spec.mean), list(spec.std))[0]

    single = torch.stack([one_pass(x) for x in decoded])
    share = {name: torch.stack([levels(x[k], reference[k], spec.std) > 0.5 for k in range(len(x))]).float().mean()
             for name, x in (("two", two_passes), ("one", single))}
    assert share["two"] < share["one"] / 3, share


def test_decoding_and_refusals():
    grey = np.random.default_rng(0).integers(0, 256, (10, 12), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    assert torch.equal(decode_rgb(grey), torch.from_numpy(rgb))
    assert torch.equal(decode_rgb(np.concatenate([rgb, np.zeros((10, 12, 1), np.uint8)], axis=2)), decode_rgb(rgb))
    assert torch.equal(decode_rgb(Image.fromarray(rgb)), decode_rgb(rgb))
    assert decode_rgb(rgb).data_ptr() == rgb.ctypes.data  # an RGB array is not copied
    with pytest.raises(ValueError, match="uint8"):
        decode_rgb(rgb.astype(np.float32))
    transform = BatchTransform(Preprocess(8, 8))
    with pytest.raises(ValueError, match=r"uint8 images \(B, H, W, 3\)"):
        transform(torch.zeros(2, 3, 10, 10))
    with pytest.raises(ValueError, match=r"uint8 images \(H, W, 3\)"):
        transform([torch.zeros(10, 10, 3, dtype=torch.uint8), torch.zeros(3, 10, 10)])
    with pytest.raises(ValueError, match="no images"):
        transform([])


def test_collate_keeps_images_of_different_sizes_apart():
    same = [{"x": torch.zeros(4, 5, 3, dtype=torch.uint8), "id": i} for i in range(3)]
    batch = collate_images(same)
    assert batch["x"].shape == (3, 4, 5, 3) and batch["id"].tolist() == [0, 1, 2]
    mixed = same[:2] + [{"x": torch.ones(5, 4, 3, dtype=torch.uint8), "id": 7}]
    batch = collate_images(mixed)
    assert [tuple(x.shape) for x in batch["x"]] == [(4, 5, 3), (4, 5, 3), (5, 4, 3)]
    assert batch["id"].tolist() == [0, 1, 7]


# ----------------------------------------------------------------------------- extraction, end to end


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> ImageFiles:
    """20 JPEG files of five sizes, as NOD's ImageFiles reads them."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(20):
        w, h = JPEG_SIZES[i % len(JPEG_SIZES)]
        smooth = Image.fromarray(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8))
        paths.append(folder / f"{i:03d}.jpg")
        smooth.resize((w, h), Image.BICUBIC).save(paths[-1], quality=90)
    return ImageFiles([p.name for p in paths], paths)


def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone("tiny", crop_pct=0.875)  # resize 73, crop 64: every image is resized and cropped


def datamodule(images, transform, batch_size=6) -> ImageDataModule:
    dm = ImageDataModule(batch_size=batch_size)
    dm.images = images
    dm.set_transform(transform)
    return dm


def test_device_path_gives_the_features_of_the_cpu_path(jpegs):
    backbone = tiny_backbone()
    ids = np.arange(len(jpegs))[::-1].copy()
    features = {}
    for where in ("device", "cpu"):
        dm = datamodule(jpegs, loader_transform(backbone, where))
        batch = next(iter(dm.images_loader(ids)))
        assert isinstance(batch["x"], list) if where == "device" else batch["x"].dtype == torch.float32
        features[where] = extract_features(backbone, dm.images_loader(ids), progress=False, preprocess_on=where)
    assert features["device"].shape == (len(ids), backbone.n_features)
    assert torch.equal(features["device"], features["cpu"])
    no_prefetch = list(iter_features(backbone, datamodule(jpegs, loader_transform(backbone, "device"))
                                     .images_loader(ids), progress=False, prefetch=0))
    assert torch.equal(torch.cat(no_prefetch), features["cpu"])
    with torch.no_grad():  # and both are the backbone on the per-image transform's pixels
        direct = backbone(torch.stack([backbone.transform(jpegs.image(i)) for i in ids]))
    torch.testing.assert_close(features["cpu"], direct)


def test_a_cache_entry_is_shared_by_both_paths_on_the_cpu(jpegs, tmp_path):
    backbone = tiny_backbone()
    ids = np.arange(len(jpegs))
    source = jpegs.source()

    def load(where, folder):
        dm = datamodule(jpegs, loader_transform(backbone, where))
        return FeatureCache(folder).load_or_build(backbone, ids, source, dm.images_loader, "cpu",
                                                   preprocess_on=where)

    built_cpu = load("cpu", tmp_path / "a")
    reused = load("device", tmp_path / "a")
    assert (built_cpu.status, reused.status) == ("built", "hit") and reused.key == built_cpu.key
    built_device = load("device", tmp_path / "b")  # built afresh on the device path: the same file, the same rows
    assert built_device.status == "built" and built_device.path.name == built_cpu.path.name
    assert torch.equal(built_device.features, built_cpu.features)
    # On a CPU the key is the one of the files written before the key recorded where extraction ran
    # (no "pixels" field): those files stay valid. On CUDA, or another resize arithmetic, it differs.
    cpu_keys = [feature_key(backbone, source, ids, pixel_record(backbone, "cpu", where)) for where in ("device", "cpu")]
    assert cpu_keys[0] == cpu_keys[1] and "pixels" not in cpu_keys[0]
    assert set(cpu_keys[0]) == {"backbone", "weights", "layers", "normalize", "n_features", "spec", "stimuli",
                                "ids_sha", "n_ids"}
    cuda = {where: feature_key(backbone, source, ids, pixel_record(backbone, "cuda", where))
            for where in ("device", "cpu")}
    assert cuda["device"]["pixels"] == {"device": "cuda", "resize": "float32-separable"}
    assert cuda["cpu"]["pixels"] == {"device": "cuda", "resize": resize_arithmetic(backbone.preprocess, "cpu")}


def test_a_loader_of_the_other_kind_is_refused(jpegs):
    backbone = tiny_backbone()
    dm = datamodule(jpegs, loader_transform(backbone, "device"))
    with pytest.raises(RuntimeError, match="yields decoded uint8 images, but preprocess_on='cpu'"):
        extract_features(backbone, dm.images_loader(np.arange(4)), progress=False, preprocess_on="cpu")
    with pytest.raises(ValueError, match="preprocess_on must be one of"):
        loader_transform(backbone, "gpu")


# ----------------------------------------------------------------------------- the prefetch thread


class Source:
    """A stimulus source of 40 same-size images that counts its reads and raises ``error`` at id ``fail``."""

    def __init__(self, fail: int | None = None, error: Exception | None = None):
        self.images = np.random.default_rng(1).integers(0, 256, (40, 70, 80, 3), dtype=np.uint8)
        self.fail, self.error, self.reads = fail, error, 0

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        if i == self.fail:
            raise self.error
        self.reads += 1
        return self.images[i]


def loader(source: Source, transform) -> DataLoader:
    return DataLoader(StimulusDataset(source, np.arange(len(source)), transform), batch_size=4,
                      collate_fn=collate_images)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "brainprobe-extract-prefetch" and t.is_alive()]


@pytest.mark.parametrize("where", ["device", "cpu"])
def test_an_error_in_the_loader_thread_surfaces_unchanged(where):
    from datamodules.errors import DataError

    backbone = tiny_backbone()
    error = DataError("img/017.jpg: cannot read as an image (truncated)")
    source = Source(fail=17, error=error)
    got = []
    with pytest.raises(DataError) as raised:
        for rows in iter_features(backbone, loader(source, loader_transform(backbone, where)), progress=False,
                                  preprocess_on=where):
            got.append(rows)
    assert raised.value is error and str(raised.value) == "img/017.jpg: cannot read as an image (truncated)"
    clean = extract_features(backbone, loader(Source(), loader_transform(backbone, where)), progress=False)
    assert len(got) == 4 and torch.equal(torch.cat(got), clean[:16])  # the batches before the bad one
    assert not prefetch_threads()


def test_the_prefetch_thread_stops_when_the_consumer_stops_early():
    backbone = tiny_backbone()
    source = Source()
    features = iter_features(backbone, loader(source, loader_transform(backbone, "device")), progress=False,
                             prefetch=2)
    first = next(features)
    assert first.shape == (4, backbone.n_features) and len(prefetch_threads()) == 1
    features.close()
    assert not prefetch_threads()
    assert source.reads <= 4 * 6 < len(source)  # read ahead by a few batches, not to the end


# ----------------------------------------------------------------------------- train.py


FAST = ["experiment=demo", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none"]


def test_train_shares_the_cache_between_the_two_paths_and_records_the_choice(make_cfg, synthetic_root, tmp_path):
    from train import ConfigError, train

    overrides = FAST + [f"data.root={synthetic_root}", "data.synthetic=null", "features=cached"]
    runs = {where: train(make_cfg(overrides + [f"preprocess_on={where}"], tmp_path / where), tmp_path / where)
            for where in ("cpu", "device")}
    info = {where: json.loads((tmp_path / where / "run.json").read_text())["features"] for where in runs}
    assert info["cpu"]["preprocess_on"] == "cpu" and info["device"]["preprocess_on"] == "device"
    assert (info["cpu"]["cache_status"], info["device"]["cache_status"]) == ("built", "hit")
    assert info["cpu"]["cache_key"] == info["device"]["cache_key"]
    assert info["cpu"]["pixels"] == info["device"]["pixels"] and info["cpu"]["pixels"]["device"] == "cpu"
    assert runs["device"].metrics["test"]["r_mean"] == runs["cpu"].metrics["test"]["r_mean"]
    fresh = train(make_cfg(overrides + ["features=precompute"], tmp_path / "fresh"), tmp_path / "fresh")  # device
    # extracted again, in other batches (the convolution's float sums may depend on the batch on some BLAS)
    assert fresh.metrics["test"]["r_mean"] == pytest.approx(runs["cpu"].metrics["test"]["r_mean"], abs=1e-6)
    with pytest.raises(ConfigError, match=r"preprocess_on must be one of device, cpu, got 'gpu'"):
        train(make_cfg(overrides + ["preprocess_on=gpu"], tmp_path / "bad"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "run.json").exists()
