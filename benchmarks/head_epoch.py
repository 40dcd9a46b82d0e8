"""One epoch of the linear head: the LightningModule as train.py runs it vs a bare loop on the same tensors.

    python benchmarks/head_epoch.py                 # n=8000 images, 2048 features, 16000 voxels, batch 128
    python benchmarks/head_epoch.py --quick         # n=2000, 512 features, 4000 voxels (a minute)
    python benchmarks/head_epoch.py --n 9000 --features 4096 --voxels 30000 --only loader
    python benchmarks/head_epoch.py --threads 1 --cpu-time --epochs 2 --repeats 5 --only epoch   # a loaded machine
    python benchmarks/head_epoch.py --device cuda --n 9000 --features 4096 --voxels 30000 --repeats 2 --no-progress-bar

Side by side in one process, the order rotated in every repeat:
- ``bare``: a hand-written loop: for each batch of a seeded permutation, rows gathered by index,
  standardised, LinearHead, MSE, backward, AdamW step (conf/optimizer/adamw.yaml), ExponentialLR per epoch.
- ``index``: EncodingModel trained by the Trainer train.py builds (trainer=cpu, or on ``--device cuda:N``
  trainer.accelerator=gpu trainer.devices=[N]; the default callbacks:
  best/last checkpoints and early stopping, csv logger, progress bar as configured), features served
  by the datamodule as batches drawn by index from tensors on the device (``data.feature_batches=auto``).
- ``per_item``: the same with ``data.feature_batches=per_item``, a DataLoader over FeatureDataset (before).
Epoch time = the training batches of an epoch, Lightning's per-step hooks, logging and optimizer
closure included; the validation pass and the two checkpoints that follow are printed apart. Each run
trains ``--epochs`` epochs and its first is left out (warm-up). Medians over repeats × epochs, and
the median of the per-repeat ratios. On a shared, loaded machine wall-clock epochs scatter widely
(a descheduled OpenMP thread stalls every parallel op): ``--threads 1 --cpu-time`` times the work done.

``--device cuda[:N]``: every path on that GPU — the bare loop's tensors, head and optimizer there, the
Trainer on it (the index path's features and responses placed there by ``feature_batches=auto``; the
per-item path copies each batch over, as Lightning does). The clock synchronises the device before it is
read (at an epoch's start and after its last batch: no extra synchronisation between steps); the peak
device memory of each path (``torch.cuda.max_memory_allocated`` above what was held before the run) is
printed beside its time. ``--cpu-time`` is refused there (it counts host CPU time only).

``loader``: one pass over the training batches alone (no arithmetic), per-item vs by index, each batch
delivered on the device (per-item: copied there as Lightning's loop does).
``host``: the same three loops at 16 features × 16 voxels on one thread, where the arithmetic is
negligible: the host time per batch, below which no device can take a batch (a GPU epoch takes at
least n_batches × that; the device time per batch is then about 3 matmuls of batch × features × voxels).
On the CPU it is this process's CPU time; on ``--device cuda`` the wall time of the loops run on the GPU,
where the GPU finishes each kernel as soon as it is launched: the time the host needs per batch, which
the GPU spends waiting whenever its own work per batch is shorter.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from datamodules.serving import ResponseDataModule  # noqa: E402
from encoders.heads import LinearHead  # noqa: E402
from encoders.model import EncodingModel  # noqa: E402

PATHS = ("bare", "index", "per_item")


class ArrayDataModule(ResponseDataModule):
    """Features (n, d) and responses (n, v) in memory: the first n_train rows train, the rest validate."""

    def __init__(self, features: torch.Tensor, responses: np.ndarray, n_train: int, **kwargs):
        super().__init__(**kwargs)
        n = len(features)
        self.data = SimpleNamespace(rois={}, ncsnr=np.ones(responses.shape[1]))
        rows = {"train": np.arange(n_train), "val": np.arange(n_train, n)}
        self.split_ids = rows
        self._responses = {s: responses[r] for s, r in rows.items()}
        self._repeats = {s: np.ones(len(r)) for s, r in rows.items()}
        self.set_features({s: features[r] for s, r in rows.items()})

    def setup(self, stage=None):
        pass


def make_data(n_train: int, d: int, v: int, seed: int = 0):
    """Features (n, d) and responses (n, v) = a linear map + noise, float32; n = n_train + n_train/9 (val)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + max(1, n_train // 9)
    X = torch.randn(n, d, generator=g)
    Y = torch.empty(n, v)
    for start in range(0, v, 4096):
        W = torch.randn(d, min(4096, v - start), generator=g) / math.sqrt(d)
        Y[:, start:start + W.shape[1]] = X @ W + torch.randn(n, W.shape[1], generator=g)
    return X, Y.numpy()


def parse_device(text: str) -> torch.device:
    """"cpu", "cuda" or "cuda:N" -> a device torch can use here; ValueError (one line) otherwise."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {text}: no CUDA device is visible to torch (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'})")
    index, count = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {text}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def trainer_overrides(device: torch.device) -> list[str]:
    """The trainer config of a run on ``device``: trainer=cpu, or the default trainer on GPU ``device.index``."""
    if device.type == "cpu":
        return ["trainer=cpu"]
    return ["trainer.accelerator=gpu", f"trainer.devices=[{device.index}]"]


def train_config(tmp: Path, epochs: int, progress_bar: bool):
    """train.py's config (trainer on DEVICE, default callbacks, csv logger), outputs under tmp."""
    GlobalHydra.instance().clear()
    overrides = [*trainer_overrides(DEVICE), "logger=csv", f"trainer.max_epochs={epochs}",
                 "callbacks.early_stopping.patience=1000", f"trainer.enable_progress_bar={str(progress_bar).lower()}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def clock() -> float:
    """Wall seconds, or this process's CPU seconds with --cpu-time (robust on a loaded machine when single-threaded).

    On a GPU the device is synchronised first: the time includes the work queued so far.
    """
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.process_time() if CPU_TIME else time.perf_counter()


CPU_TIME = False
DEVICE = torch.device("cpu")


def memory_start() -> int:
    """Before a run on a GPU: what is left of earlier runs freed, the peak counter reset; bytes still allocated."""
    if DEVICE.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize(DEVICE)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    return torch.cuda.memory_allocated(DEVICE)


def memory_peak(start: int) -> int:
    """Peak bytes allocated on the GPU since ``memory_start`` above what was held then (0 on the CPU)."""
    return torch.cuda.max_memory_allocated(DEVICE) - start if DEVICE.type == "cuda" else 0


class EpochClock(L.Callback):
    """Per epoch: the training batches (start of epoch -> end of its last batch) and the whole epoch.

    The clock is read (on a GPU: the device synchronised) at the epoch's start and after its last training
    batch only, so the host may queue steps ahead as it does in training.
    """

    def __init__(self):
        self.train, self.whole, self.batches = [], [], 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = self.last = clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches = batch_idx + 1
        if self.batches >= trainer.num_training_batches:
            self.last = clock()

    def on_train_epoch_end(self, trainer, pl_module):
        self.train.append(self.last - self.start)
        self.whole.append(clock() - self.start)


def run_lightning(path: str, X, Y, n_train: int, batch: int, epochs: int, progress_bar: bool) -> EpochClock:
    """Trains EncodingModel(LinearHead) as train.py does; returns the epoch clock."""
    from train import build_trainer
    d, v = X.shape[1], Y.shape[1]
    with tempfile.TemporaryDirectory(prefix="head_epoch_") as tmp:
        cfg = train_config(Path(tmp), epochs, progress_bar)
        dm = ArrayDataModule(X, Y, n_train, seed=0, batch_size=batch,
                             feature_batches="auto" if path == "index" else "per_item")
        model = EncodingModel(LinearHead(d, v), d, v, optimizer=instantiate(cfg.optimizer),
                              scheduler=instantiate(cfg.scheduler), seed=0)
        model.set_feature_stats(X[:n_train].mean(0), X[:n_train].std(0))
        trainer = build_trainer(cfg)
        clock = EpochClock()
        trainer.callbacks.append(clock)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(model, datamodule=dm)
    return clock


def run_bare(X, Y, n_train: int, batch: int, epochs: int) -> list[float]:
    """The hand-written loop on the same tensors, on DEVICE (put there before the first epoch); seconds per epoch."""
    torch.use_deterministic_algorithms(False)  # a plain loop does not ask for it (Lightning's Trainer did)
    d, v = X.shape[1], Y.shape[1]
    Xt, Yt = X[:n_train].to(DEVICE), torch.from_numpy(Y[:n_train]).to(DEVICE)
    mean, std = Xt.mean(0), Xt.std(0)
    head = LinearHead(d, v).to(DEVICE)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.97)
    times = []
    for epoch in range(epochs):
        start = clock()
        # Drawn on the host and sent over once per epoch, as the datamodule's batches by index do.
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(epoch)).to(DEVICE)
        for idx in order.split(batch):
            pred = head((Xt.index_select(0, idx) - mean) / std)
            loss = torch.nn.functional.mse_loss(pred, Yt.index_select(0, idx))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        times.append(clock() - start)
    return times


def loader_pass(path: str, X, Y, n_train: int, batch: int) -> float:
    """Seconds for one pass over the training batches, each delivered on DEVICE, nothing else.

    By index, the datamodule places the split on the device first (as at the start of a fit, not timed); it
    reads the device from its trainer, here a stand-in that carries only the device. Per item, each batch
    is moved to the device as Lightning's loop moves it.
    """
    dm = ArrayDataModule(X, Y, n_train, seed=0, batch_size=batch,
                         feature_batches="auto" if path == "index" else "per_item")
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=DEVICE), distributed_sampler_kwargs=None)
    loader = dm.train_dataloader()
    start = clock()
    for b in loader:
        if path != "index":
            move_data_to_device(b, DEVICE)
    return clock() - start


def measure(X, Y, n_train, batch, epochs, repeats, paths, progress_bar, verbose=True) -> dict:
    """{path: {"train": [s per epoch], "rest": [s per epoch], "ratio": [per repeat], "peak": bytes}}, the paths
    rotated every repeat; "peak": the most device memory a run of the path took (GPU only, else 0)."""
    out = {p: {"train": [], "rest": [], "ratio": [], "peak": 0} for p in paths}
    for r in range(repeats):
        order = paths[r % len(paths):] + paths[:r % len(paths)]
        this = {}
        for path in order:
            held = memory_start()
            if path == "bare":
                times = run_bare(X, Y, n_train, batch, epochs)[1:]
                rest = [0.0] * len(times)
            else:
                clock = run_lightning(path, X, Y, n_train, batch, epochs, progress_bar)
                times = clock.train[1:]
                rest = [w - t for w, t in zip(clock.whole[1:], clock.train[1:])]
            out[path]["peak"] = max(out[path]["peak"], memory_peak(held))
            out[path]["train"] += times
            out[path]["rest"] += rest
            this[path] = statistics.median(times)
            if verbose:
                print(f"    repeat {r + 1}: {path} {' '.join(f'{t:.3f}' for t in times)} s", flush=True)
        for path in paths:
            if "bare" in this:
                out[path]["ratio"].append(this[path] / this["bare"])
    return out


def report(out: dict, n_batches: int, label: str, per_batch: bool = False) -> None:
    for path, m in out.items():
        med = statistics.median(m["train"])
        line = f"  {path:9s} {med:8.3f} s/epoch  ({1000 * med / n_batches:7.2f} ms/batch)"
        if m["ratio"] and path != "bare":
            line += f"   {statistics.median(m['ratio']):.2f}x bare (median of per-repeat ratios)"
        if any(m["rest"]):
            line += f"   + validation & checkpoints {statistics.median(m['rest']):.2f} s"
        if m["peak"] and not per_batch:
            line += f"   peak {DEVICE} memory {m['peak'] / 2**30:.2f} GiB"
        print(line)
    if per_batch:
        return
    print(f"  ({label}: medians over {len(next(iter(out.values()))['train'])} epochs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8000, help="training images")
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--voxels", type=int, default=16000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n=2000, 512 features, 4000 voxels")
    parser.add_argument("--only", choices=("epoch", "loader", "host"), help="one part only")
    parser.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True,
                        help="Lightning's progress bar, as conf/trainer/default.yaml (on)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time epochs by this process's CPU time, not wall time (for a loaded machine; "
                             "use with --threads 1, where no thread waits spinning; CPU only)")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda | cuda:N: where every path trains (default cpu)")
    args = parser.parse_args()
    global CPU_TIME, DEVICE
    try:
        DEVICE = parse_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.cpu_time and DEVICE.type != "cpu":
        print(f"error: --cpu-time counts this process's CPU time only, not the work on --device {args.device}; "
              "leave it out (the clock synchronises the device)", file=sys.stderr)
        sys.exit(2)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
        # What the Trainer (deterministic=True) sets at its construction, set before any path runs: the
        # same cuBLAS workspace for all of them, whichever runs first.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    CPU_TIME = args.cpu_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.features, args.voxels = 2000, 512, 4000
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    n_batches = math.ceil(args.n / args.batch)
    where = "cpu"
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        where = f"{DEVICE} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    print(f"device {where}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CPU' if CPU_TIME else 'wall'} time; n={args.n}, features={args.features}, voxels={args.voxels}, "
          f"batch={args.batch} ({n_batches} batches/epoch)")
    X, Y = make_data(args.n, args.features, args.voxels)

    if args.only in (None, "loader"):
        per_item = [loader_pass("per_item", X, Y, args.n, args.batch) for _ in range(args.repeats)]
        index = [loader_pass("index", X, Y, args.n, args.batch) for _ in range(args.repeats)]
        print(f"loader alone, one epoch: per_item {statistics.median(per_item):.3f} s, "
              f"by index {statistics.median(index):.3f} s")
    if args.only in (None, "epoch"):
        print("training epoch (median):")
        out = measure(X, Y, args.n, args.batch, args.epochs, args.repeats, list(PATHS), args.progress_bar)
        report(out, n_batches, "epoch")
    if args.only in (None, "host"):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        CPU_TIME = DEVICE.type == "cpu"  # on a GPU: wall time, the device synchronised
        Xs, Ys = make_data(args.n, 16, 16)
        out = measure(Xs, Ys, args.n, args.batch, max(args.epochs, 3), args.repeats, list(PATHS), args.progress_bar,
                      verbose=False)
        torch.set_num_threads(threads)
        CPU_TIME = args.cpu_time
        if DEVICE.type == "cuda":
            print(f"host time per batch (16 features x 16 voxels on {DEVICE}, 1 host thread, wall time: the GPU "
                  "finishes each kernel as it is launched, so this is what the host needs per batch):")
        else:
            print("host time per batch (16 features x 16 voxels, 1 thread, CPU time of this process):")
        report(out, n_batches, "host", per_batch=True)
        host = statistics.median(out["index"]["train"]) / n_batches
        flop = 3 * 2 * args.batch * args.features * args.voxels
        print(f"  -> a GPU epoch of {n_batches} batches takes >= {1000 * n_batches * host:.0f} ms of host time "
              f"({1000 * host:.2f} ms/batch); its arithmetic is {flop / 1e9:.1f} GFLOP/batch")


if __name__ == "__main__":
    main()
