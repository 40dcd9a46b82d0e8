"""Feature-extraction throughput: our pipeline vs the bare backbone forward, side by side.

    python benchmarks/extract.py                                  # AlexNet + ResNet-50 (random init), CPU
    python benchmarks/extract.py --device cuda --images 2048 --batch 128 --workers 8
    python benchmarks/extract.py --source jpeg                    # JPEGs of mixed sizes, as NOD's
    python benchmarks/extract.py --quick                          # small: AlexNet, 96 images, 2 repeats

Pipeline = ``FeatureCache.load_or_build`` into a fresh directory, as train.py runs it: the datamodule's loader
reads the images by id (``--source brick``: NSD's imgBrick, 425 px, in HDF5, uncompressed as NSD ships it,
or ``--brick gzip`` as the synthetic dataset writes it; ``jpeg``: files of four sizes decoded by PIL, as
NOD's ImageFiles), the backbone's preprocessing (``preprocess_on=device``: the loader only decodes and the
resize, crop and normalisation run batched on the extraction device; ``cpu``: the per-image transform in the
loader), the hooked backbone with pooling, the HDF5 cache write and its read-back check. Bare = the
library model's own forward (the whole model) on the same images, already transformed and already on the
device, same batch size; hooked = our backbone's forward alone on those tensors (the requested layers and
pooling, stopping after the last layer: for AlexNet's pool5 it skips the classifier, which the bare
forward runs). The runs alternate within each repeat; medians over repeats; overhead = pipeline / baseline
- 1, for the whole ``load_or_build`` and for its streaming part alone (``ExtractionStats.seconds``: reading,
preprocessing, forward and row writes, without the fixed per-extraction cost of the key, the file and the
read-back check, which a few hundred images do not amortise). The images are synthetic drawings
(datamodules/synthetic_images.py), written to a temporary folder first.

Host cost per image (medians): reading + decoding (the loader with the decode-only transform, one thread),
the per-image transform on the CPU, the batched transform on the device, the cache write at the backbone's
width (without HDF5's chunk cache, as FeatureCache writes, and with the default chunk cache), and the fixed
cost of one extraction's cache key (hashing the weights). On CUDA the timings synchronise the device.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.image_stimuli import ImageDataModule  # noqa: E402
from datamodules.nod_files import ImageFiles  # noqa: E402
from datamodules.nsd_files import StimulusBrick  # noqa: E402
from datamodules.synthetic_images import CATEGORIES, draw_image  # noqa: E402
from encoders.backbones import build_backbone  # noqa: E402
from encoders.extract import ExtractionStats, loader_transform  # noqa: E402
from encoders.feature_cache import FeatureCache, weights_fingerprint  # noqa: E402
from encoders.preprocess import BatchTransform, decode_rgb  # noqa: E402

JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (640, 480))  # (width, height): ImageNet / COCO-like


def write_images(folder: Path, n: int, source: str, brick: str) -> object:
    """n synthetic images as a stimulus source (StimulusBrick over an NSD-layout HDF5, or ImageFiles)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    if source == "brick":
        path = folder / "nsd_stimuli.hdf5"
        with h5py.File(path, "w") as f:
            kw = dict(chunks=(1, 425, 425, 3), compression="gzip", compression_opts=1) if brick == "gzip" else {}
            d = f.create_dataset("imgBrick", shape=(n, 425, 425, 3), dtype=np.uint8, **kw)
            for i in range(n):
                d[i] = draw_image(CATEGORIES[i % len(CATEGORIES)], rng, 425)
        return StimulusBrick(path)
    paths = []
    for i in range(n):
        w, h = JPEG_SIZES[i % len(JPEG_SIZES)]
        image = Image.fromarray(draw_image(CATEGORIES[i % len(CATEGORIES)], rng, max(w, h))).resize((w, h))
        paths.append(folder / f"{i:05d}.jpg")
        image.save(paths[-1], quality=90)
    return ImageFiles([p.name for p in paths], paths)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_seconds(backbone, dm: ImageDataModule, ids: np.ndarray, device: torch.device,
                     preprocess_on: str) -> tuple[float, ExtractionStats]:
    dm.set_transform(loader_transform(backbone, preprocess_on))
    stats = ExtractionStats()
    with tempfile.TemporaryDirectory() as tmp:
        sync(device)
        start = time.perf_counter()
        FeatureCache(tmp).load_or_build(backbone, ids, {"benchmark": "extract"}, dm.images_loader, str(device),
                                        stats=stats, preprocess_on=preprocess_on)
        return time.perf_counter() - start, stats


@torch.no_grad()
def synced_seconds(step, batches: list, device: torch.device) -> float:
    """Wall time of step(batch) over the batches, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    return time.perf_counter() - start


def bare_seconds(model: torch.nn.Module, batches: list[torch.Tensor], forward, device: torch.device) -> float:
    return synced_seconds(lambda x: forward(model, x), batches, device)


def bare_forward(name: str):
    """The library's own image forward, without our hooks or pooling."""
    if name.startswith("clip") or name.startswith("siglip"):
        return lambda m, x: m.encode_image(x)
    return lambda m, x: m(x)


def read_seconds(dm: ImageDataModule, ids: np.ndarray) -> float:
    """Reading and decoding alone (decode-only transform, collate), in this thread."""
    dm.set_transform(loader_transform(None, "device"))
    start = time.perf_counter()
    for _ in dm.images_loader(ids):
        pass
    return time.perf_counter() - start


def per_image_seconds(backbone, images: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for image in images:
        backbone.transform(image)
    return time.perf_counter() - start


def batched_seconds(transform: BatchTransform, batches: list, device: torch.device) -> float:
    return synced_seconds(lambda batch: transform(batch, device), batches, device)


def cache_write_seconds(n: int, width: int, batch: int, folder: Path, chunk_cache: bool) -> float:
    """FeatureCache's write loop (rows assigned, flushed, n_done updated, flushed) for n rows of ``width``."""
    rows = np.random.default_rng(0).standard_normal((batch, width), dtype=np.float32)
    path = folder / f"write-{chunk_cache}.h5"
    start = time.perf_counter()
    with h5py.File(path, "w", **({} if chunk_cache else {"rdcc_nbytes": 0})) as f:
        d = f.create_dataset("features", shape=(n, width), dtype=np.float32, chunks=(min(n, 256), width))
        for done in range(0, n, batch):
            k = min(batch, n - done)
            d[done:done + k] = rows[:k]
            f.flush()
            f.attrs["n_done"] = done + k
            f.flush()
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["alexnet", "resnet50"])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu | cuda (the extraction device)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (data.num_workers)")
    p.add_argument("--source", choices=["brick", "jpeg"], default="brick")
    p.add_argument("--brick", choices=["plain", "gzip"], default="plain",
                   help="imgBrick uncompressed (as NSD ships it) or gzip-1 chunks (as the synthetic dataset)")
    p.add_argument("--no-cpu-path", action="store_true", help="skip the per-image (preprocess_on=cpu) pipeline")
    p.add_argument("--quick", action="store_true", help="AlexNet, 96 images, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.backbones, args.images, args.repeats = ["alexnet"], 96, 2
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        images = write_images(tmp, args.images, args.source, args.brick)
        made = time.perf_counter() - start
        dm = ImageDataModule(batch_size=args.batch, num_workers=args.workers)
        dm.images = images
        ids = np.arange(args.images)
        what = (f"NSD imgBrick 425 px, {'uncompressed' if args.brick == 'plain' else 'gzip-1'} HDF5"
                if args.source == "brick" else f"JPEG files of {len(JPEG_SIZES)} sizes")
        print(f"{args.images} images ({what}; written in {made:.0f} s), batch {args.batch}, device {device}, "
              f"{torch.get_num_threads()} threads, {args.workers} loader workers, {args.repeats} repeats",
              flush=True)
        decoded = [images.image(i) for i in ids]
        reads = [read_seconds(dm, ids) for _ in range(args.repeats)]
        read_ms = 1000 * statistics.median(reads) / len(ids)
        for name in args.backbones:
            backbone = build_backbone(name, pretrained=False)
            model = backbone.model.to(device)
            batch_transform = BatchTransform(backbone.preprocess)
            batches = [torch.stack([backbone.transform(im) for im in decoded[s:s + args.batch]]).to(device)
                       for s in range(0, len(ids), args.batch)]
            raw = [[decode_rgb(im) for im in decoded[s:s + args.batch]]
                   for s in range(0, len(ids), args.batch)]
            raw = [torch.stack(b) if len({t.shape for t in b}) == 1 else b for b in raw]
            forward = bare_forward(name)
            bare_seconds(model, batches[:1], forward, device)  # warm-up (and cuDNN's choice of kernels)
            batched_seconds(batch_transform, raw[:1], device)
            runs: dict[str, list[float]] = {}

            def add(what: str, seconds: float) -> None:
                runs.setdefault(what, []).append(seconds)

            paths = ["device"] if args.no_cpu_path else ["device", "cpu"]
            for _ in range(args.repeats):
                add("bare", bare_seconds(model, batches, forward, device))
                add("hooked", bare_seconds(backbone, batches, lambda m, x: m(x), device))
                for path in paths:
                    seconds, stats = pipeline_seconds(backbone, dm, ids, device, path)
                    add(path, seconds)
                    add(f"{path} streaming", stats.seconds)
                    add(f"{path} waiting", stats.waiting_s)
                add("per_image", per_image_seconds(backbone, decoded))
                add("batched", batched_seconds(batch_transform, raw, device))
            med = {k: statistics.median(v) for k, v in runs.items()}
            n = len(ids)

            def rate(what: str) -> str:
                vs = [f"{100 * (med[what] / med[base] - 1):+6.1f}% vs {base}" for base in ("bare", "hooked")]
                return f"{n / med[what]:7.1f} img/s  " + ", ".join(vs)

            print(f"{name:10s} bare forward (the library's whole model) {n / med['bare']:7.1f} img/s; hooked "
                  f"forward (our layers and pooling, early stop) {n / med['hooked']:7.1f} img/s", flush=True)
            for path in paths:
                print(f"{name:10s} pipeline preprocess_on={path:6s} {rate(path)}; streaming (without the fixed "
                      f"{med[path] - med[f'{path} streaming']:.2f} s per extraction: key, file, read-back check) "
                      f"{rate(f'{path} streaming')}", flush=True)
            width = backbone.n_features
            writes = {cc: statistics.median(cache_write_seconds(n, width, args.batch, tmp, cc)
                                            for _ in range(args.repeats)) for cc in (False, True)}
            start = time.perf_counter()
            weights_fingerprint(backbone.model)
            key_s = time.perf_counter() - start
            per = {k: f"{1000 * med[k] / n:.2f} ms" for k in med}
            print(f"{name:10s} host per image: read+decode {read_ms:.2f} ms, per-image transform (CPU) "
                  f"{per['per_image']}, batched transform ({device.type}) {per['batched']}; the forward (bare) "
                  f"{per['bare']}; the device pipeline waited for images {per['device waiting']}", flush=True)
            print(f"{name:10s} cache write ({width} features): {1000 * writes[False] / n:.3f} ms/img without "
                  f"HDF5's chunk cache (FeatureCache) vs {1000 * writes[True] / n:.3f} ms/img with the default "
                  f"one (x{writes[False] / writes[True]:.2f}); cache key (hashing the weights) {key_s:.2f} s "
                  f"per extraction", flush=True)

if __name__ == "__main__":
    main()
