"""Head training without a per-item loader: batches drawn by index from tensors on the device.

Every check compares against the per-item path it replaces (a DataLoader over FeatureDataset with
the sampler a DataLoader, or Lightning under DDP, would use): the same rows in the same order, and
through Lightning the same weights, validation and test scores, resumed or not.
"""
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from datamodules.serving import FeatureDataset, ResponseDataModule
from datamodules.tensor_batches import TensorBatches, choose_placement
from encoders.heads import LinearHead, MLPHead
from encoders.model import EncodingModel

N, D, V = 37, 5, 6  # 37 rows: the last batch is partial, and DDP pads a rank


def split_data(n=N, d=D, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, v, generator=g).numpy(), np.arange(100, 100 + n)


def reference_batches(features, responses, ids, batch_size, sampler):
    loader = DataLoader(FeatureDataset(features, ids, responses), batch_size=batch_size, sampler=sampler)
    return list(loader)


def assert_same_batches(got, want):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        for key in ("x", "y", "id"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("placement,chunk_batches", [("device", None), ("stream", 1), ("stream", 3)])
@pytest.mark.parametrize("batch_size", [4, 64])
def test_shuffled_batches_equal_the_per_item_loader_every_epoch(placement, chunk_batches, batch_size):
    """RandomSampler whose generator is re-seeded every epoch, as EncodingModel does."""
    features, responses, ids = split_data()
    ours = TensorBatches(features, responses, ids, RandomSampler(range(N)), batch_size, placement=placement,
                         chunk_batches=chunk_batches)
    loader = DataLoader(FeatureDataset(features, ids, responses), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    assert len(ours) == len(loader)
    orders = []
    for epoch in range(3):
        ours.sampler.generator = torch.Generator().manual_seed(100 + epoch)
        loader.sampler.generator = torch.Generator().manual_seed(100 + epoch)
        got = list(ours)
        assert_same_batches(got, list(loader))
        orders.append(torch.cat([b["id"] for b in got]))
    assert sorted(orders[0].tolist()) == ids.tolist()
    assert not torch.equal(orders[0], orders[1])  # a new order every epoch


def test_sequential_batches_equal_the_per_item_loader():
    features, responses, ids = split_data()
    got = list(TensorBatches(features, responses, ids, SequentialSampler(range(N)), 8, placement="stream",
                             chunk_batches=2))
    assert_same_batches(got, list(DataLoader(FeatureDataset(features, ids, responses), batch_size=8)))


@pytest.mark.parametrize("placement", ["device", "stream"])
@pytest.mark.parametrize("world,shuffle", [(2, True), (3, True), (2, False)])
def test_ddp_shards_equal_distributed_sampler_loaders(world, shuffle, placement):
    """Each rank draws its DistributedSampler share (padded as torch pads), epoch by epoch."""
    features, responses, ids = split_data()
    dataset = FeatureDataset(features, ids, responses)
    seen = []
    for epoch in (0, 1):
        for rank in range(world):
            mine = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=shuffle, seed=5)
            theirs = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=5)
            mine.set_epoch(epoch), theirs.set_epoch(epoch)
            got = list(TensorBatches(features, responses, ids, mine, 4, placement=placement, chunk_batches=2))
            assert_same_batches(got, reference_batches(features, responses, ids, 4, theirs))
            if epoch == 0:
                seen += torch.cat([b["id"] for b in got]).tolist()
    assert set(seen) == set(ids.tolist()) and len(seen) == -(-N // world) * world


def test_tensor_batches_reject_mismatched_inputs():
    features, responses, ids = split_data()
    with pytest.raises(ValueError, match="as many rows"):
        TensorBatches(features, responses[:-1], ids, SequentialSampler(range(N)), 4)
    with pytest.raises(ValueError, match="placement"):
        TensorBatches(features, responses, ids, SequentialSampler(range(N)), 4, placement="gpu")
    with pytest.raises(ValueError, match="feature_batches"):
        ResponseDataModule(feature_batches="fast")


def test_placement_follows_free_device_memory(monkeypatch):
    assert choose_placement(10 ** 15, torch.device("cpu")) == "device"  # host data: never copied
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert choose_placement(500, torch.device("cuda")) == "device"
    assert choose_placement(501, torch.device("cuda")) == "stream"


class ArrayDataModule(ResponseDataModule):
    """Features and responses already in memory, split train | val | test."""

    def __init__(self, features, responses, sizes=(60, 21, 23), **kwargs):
        super().__init__(**kwargs)
        bounds = np.cumsum([0, *sizes])
        self._all = features, responses, bounds

    def setup(self, stage=None):
        if self.split_ids:
            return
        features, responses, bounds = self._all
        self.data = SimpleNamespace(rois={}, ncsnr=np.ones(responses.shape[1]))
        rows = {s: np.arange(bounds[k], bounds[k + 1]) for k, s in enumerate(("train", "val", "test"))}
        self.split_ids = rows
        self._responses = {s: responses[r] for s, r in rows.items()}
        self._repeats = {s: np.ones(len(r)) for s, r in rows.items()}
        self.set_features({s: features[r] for s, r in rows.items()})


def planted_data(n=104, d=12, v=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g)
    responses = features @ torch.randn(d, v, generator=g) + torch.randn(n, v, generator=g)
    return features, responses.numpy()


def fit(feature_batches, max_epochs, ckpt_path=None, checkpoint_dir=None):
    """Trains an EncodingModel (MLP head with dropout) as train.py does, deterministic and seeded;
    returns (model, datamodule, final val r, trainer)."""
    features, responses = planted_data()
    dm = ArrayDataModule(features, responses, seed=0, batch_size=16, feature_batches=feature_batches)
    dm.setup()
    torch.manual_seed(0)
    model = EncodingModel(MLPHead(12, 9, hidden=[16], dropout=0.3), 12, 9, seed=0, scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.9))
    model.set_feature_stats(features[:60].mean(0), features[:60].std(0))
    callbacks = [ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None)] if checkpoint_dir else []
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", deterministic=True, logger=False,
                        enable_checkpointing=bool(checkpoint_dir), callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    val_r = float(trainer.callback_metrics["val/r_mean"])
    trainer.test(model, datamodule=dm, verbose=False)
    return model, dm, val_r, trainer


def test_datamodule_serves_tensor_batches_unless_asked_per_item():
    features, responses = planted_data()
    for choice, kind in (("auto", TensorBatches), ("device", TensorBatches), ("stream", TensorBatches),
                         ("per_item", DataLoader)):
        dm = ArrayDataModule(features, responses, feature_batches=choice)
        dm.setup()
        loader = dm.train_dataloader()
        assert isinstance(loader, kind)
        if choice in ("auto", "device"):
            assert loader.placement == "device"
            # On the CPU, features and responses are used in place: nothing is copied.
            assert loader.tensors[0].data_ptr() == dm.features["train"].data_ptr()
            assert loader.tensors[1].data_ptr() == dm.targets("train").ctypes.data


@pytest.mark.parametrize("feature_batches", ["device", "stream"])
def test_training_equals_the_per_item_loader(feature_batches):
    """Same seed -> same batches -> the same weights (dropout included), val and test scores."""
    ref_model, _, ref_val, _ = fit("per_item", 4)
    model, _, val, _ = fit(feature_batches, 4)
    ref_state, state = ref_model.head.state_dict(), model.head.state_dict()
    assert ref_state["readout.weight"].abs().max() > 0.1  # it trained
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=1e-6)
    assert abs(val - ref_val) < 1e-6
    np.testing.assert_allclose(model.test_result["r"], ref_model.test_result["r"], rtol=0, atol=1e-6)
    assert np.isfinite(model.test_result["r"].numpy()).all()


class BatchLosses(L.Callback):
    """Every training batch's loss and size, and train/loss as logged at each epoch's end."""

    def __init__(self):
        self.batches, self.logged = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        if self.batches:  # the module logs after the callbacks' on_train_epoch_end: read it here
            self.logged.append(float(trainer.callback_metrics["train/loss"]))
        self.batches.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches[-1].append((float(outputs["loss"]), len(batch["y"])))

    def on_train_end(self, trainer, pl_module):
        self.logged.append(float(trainer.callback_metrics["train/loss"]))


def test_train_loss_is_the_epochs_size_weighted_mean():
    """Logged once per epoch from sums kept on the device: the mean over rows, batches weighted by size."""
    features, responses = planted_data()
    dm = ArrayDataModule(features, responses, batch_size=16)  # 60 training rows: 16, 16, 16, 12
    model = EncodingModel(LinearHead(12, 9), 12, 9)
    losses = BatchLosses()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[losses],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert len(losses.logged) == len(losses.batches) == 2
    for batches, logged in zip(losses.batches, losses.logged):
        assert [n for _, n in batches] == [16, 16, 16, 12]
        want = sum(loss * n for loss, n in batches) / 60
        assert abs(logged - want) < 1e-6 * want
        assert abs(logged - np.mean([loss for loss, _ in batches])) > 1e-6  # not the unweighted mean


def test_resume_across_data_paths_reaches_the_uninterrupted_result(tmp_path):
    """Epochs 0-1 per item, checkpoint, epochs 2-4 by index: the order depends only on (seed, epoch)."""
    fit("per_item", 2, checkpoint_dir=tmp_path / "ckpt")
    resumed, _, resumed_val, trainer = fit("device", 5, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.current_epoch == 5
    straight, _, straight_val, _ = fit("per_item", 5)
    for key, value in straight.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[key], value, rtol=0, atol=1e-6)
    assert abs(resumed_val - straight_val) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("placement", ["device", "stream"])
def test_cuda_batches_equal_the_host_loader(placement):
    features, responses, ids = split_data(n=301, d=7, v=11)
    sampler = RandomSampler(range(301), generator=torch.Generator().manual_seed(1))
    got = list(TensorBatches(features, responses, ids, sampler, 16, "cuda", placement, chunk_batches=3))
    assert all(b["x"].is_cuda and b["y"].is_cuda for b in got)
    want = reference_batches(features, responses, ids, 16,
                             RandomSampler(range(301), generator=torch.Generator().manual_seed(1)))
    assert_same_batches([{k: t.cpu() for k, t in b.items()} for b in got], want)


def test_training_skips_the_nan_fill_of_new_tensors_and_restores_it():
    """A deterministic fit does not fill new tensors with NaN (a pure check, ~3 % of a step), then restores it."""
    import torch.utils.deterministic as deterministic

    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(deterministic.fill_uninitialized_memory)

    features, responses = planted_data()
    dm = ArrayDataModule(features, responses, batch_size=32)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", deterministic=True, logger=False, enable_checkpointing=False,
                        callbacks=[Probe()], enable_progress_bar=False, enable_model_summary=False)
    assert deterministic.fill_uninitialized_memory
    trainer.fit(EncodingModel(LinearHead(12, 9), 12, 9), datamodule=dm)
    assert seen and not any(seen)
    assert deterministic.fill_uninitialized_memory
