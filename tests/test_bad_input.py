"""Bad input and broken environments (issue 15): every case is refused with one line naming the file,
before heavy work, and leaves nothing half-written.

Read-only folders: chmod where it works; as root (where chmod does not stop writes) the same refusal is
simulated by making os.open / os.mkdir refuse writes under the folder, which is what the kernel does.
Full disks: the write raises OSError(ENOSPC), or a write is silently dropped (as HDF5 does on some
failed writes); one test also uses a real, tiny tmpfs where mounting one is allowed (root in a container).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import cifti2
from torch.utils.data import DataLoader

from datamodules import nsd_files
from datamodules.errors import DataError
from datamodules.nod_files import read_dlabel
from datamodules.nsd import NSDDataModule, load_subject
from encoders.backbones import build_backbone
from encoders.checkpoint_io import AtomicCheckpointIO
from encoders.feature_cache import FeatureCache
from encoders.storage import StorageError, atomic_write, require_writable_dir
from tests.conftest import REPO
from tests.nsd_layout import SHAPE, write_minimal_nsd, write_space
from train import RunDirChecks, train, user_error

FAST = ["experiment=demo", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none"]
IMAGES = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
STIMULI = {"file": "in-memory", "size": 40}


def loader(ids):
    return DataLoader(IMAGES[torch.as_tensor(ids)], batch_size=8)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})


def cache_files(directory: Path) -> list[str]:
    """Cache files (complete or .partial) in a cache directory; its lock files are left by design."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def nsd(tmp_path):
    root = tmp_path / "nsd"
    return root, write_minimal_nsd(root)


def stimuli_path(root: Path) -> Path:
    return root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def ctab_path(root: Path, name: str, who: str = "subj01") -> Path:
    path = root / "nsddata/freesurfer" / who / "label" / f"{name}.mgz.ctab"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- read-only folders
def refuse_writes_under(folder: Path, monkeypatch) -> None:
    """Make ``folder`` read-only: chmod, and where that does not stop writes (root), make os.open and
    os.mkdir refuse writes under it with EACCES, as the kernel does for a read-only folder."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return  # chmod works here
    probe.unlink()
    real_open, real_mkdir = os.open, os.mkdir
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder.absolute())

    def guarded_open(path, flags, *args, **kwargs):
        if flags & writes and inside(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


@pytest.fixture
def restore_mode():
    folders = []
    yield folders.append
    for folder in folders:
        folder.chmod(0o755)


def test_read_only_cache_directory_serves_the_complete_file_it_holds(tmp_path, monkeypatch, restore_mode):
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    cache_dir = tmp_path / "cache"
    built = FeatureCache(cache_dir).load_or_build(backbone, np.arange(40), STIMULI, loader)
    for lock in cache_dir.glob("*.lock"):
        lock.unlink()  # as if the files had been copied to a shared, read-only place
    before = sorted(p.name for p in cache_dir.iterdir())
    restore_mode(cache_dir)
    refuse_writes_under(cache_dir, monkeypatch)
    hit = FeatureCache(cache_dir).load_or_build(backbone, np.arange(40), STIMULI, loader)
    assert hit.status == "hit" and torch.equal(hit.features, built.features)
    assert sorted(p.name for p in cache_dir.iterdir()) == before  # no lock file, nothing else

    with pytest.raises(StorageError) as err:  # another key: it would have to be built, and cannot be
        FeatureCache(cache_dir).load_or_build(backbone, np.arange(20), STIMULI, loader)
    message = str(err.value)
    assert message.startswith(f"{cache_dir}: cannot write the feature cache there (Permission denied)")
    assert "no complete cache file for this run" in message and "feature_cache_dir" in message
    assert sorted(p.name for p in cache_dir.iterdir()) == before


def test_read_only_output_directory_is_one_line_before_hydra_writes(tmp_path, monkeypatch, restore_mode, capsys):
    parent = tmp_path / "outputs"
    parent.mkdir()
    restore_mode(parent)
    refuse_writes_under(parent, monkeypatch)
    with pytest.raises(StorageError, match=rf"^{parent / 'run'}: cannot write the run directory there"):
        require_writable_dir(parent / "run", "run directory")
    config = {"hydra": {"run": {"dir": str(parent / "run")}, "sweep": {"dir": str(parent / "sweep")}}}
    from omegaconf import OmegaConf
    for hook in ("on_run_start", "on_multirun_start"):
        with pytest.raises(SystemExit) as exit_:
            getattr(RunDirChecks(), hook)(OmegaConf.create(config))
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {parent}/")
    assert list(parent.iterdir()) == []


def test_cli_unwritable_output_directory_is_one_line_and_exit_2(tmp_path):
    """Through Hydra: the run directory cannot be created (a file stands where a folder must be)."""
    blocker = tmp_path / "outputs"
    blocker.write_text("a file, not a folder")
    proc = run_cli("train.py", "logger=none", f"hydra.run.dir={blocker / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {blocker / 'run'}: cannot write the run directory there "
                                                f"(Not a directory)"]
    assert blocker.read_text() == "a file, not a folder"


# --------------------------------------------------------------------------- full disks
def test_too_little_free_space_fails_before_extraction(tmp_path, monkeypatch):
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(1))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(StorageError, match=rf"^{tmp_path / 'cache'}: 0\.0 MiB free, but the feature cache tiny-\w+\.h5 "
                                           r"needs about 0\.1 MiB \(40 images x \d+ features, float32\)"):
        FeatureCache(tmp_path / "cache").load_or_build(backbone, np.arange(40), STIMULI, loader)
    assert not calls  # no feature extraction
    assert cache_files(tmp_path / "cache") == []


def failing_row_writes(monkeypatch, after: int, silently: bool) -> None:
    """From the ``after``-th write of feature rows on, h5py raises ENOSPC (or silently drops the rows)."""
    real = h5py.Dataset.__setitem__
    count = {"n": 0}

    def setitem(self, key, value):
        if self.name == "/features":
            count["n"] += 1
            if count["n"] > after:
                if silently:
                    return None
                raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed)")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)


@pytest.mark.parametrize("silently", [False, True], ids=["raised", "silently_dropped"])
def test_full_disk_during_extraction_is_one_error_and_leaves_no_file(tmp_path, monkeypatch, silently):
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    cache = FeatureCache(tmp_path / "cache")
    failing_row_writes(monkeypatch, after=2, silently=silently)
    with pytest.raises(StorageError) as err:
        cache.load_or_build(backbone, np.arange(40), STIMULI, loader)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "cache" / "tiny-")) and ".h5.partial: " in message
    if silently:
        assert "24 of 40 feature rows did not reach the disk (first: row 16" in message
    else:
        assert "cannot write the feature cache (No space left on device) after 16 of 40 images" in message
    assert "removed it" in message and "\n" not in message
    assert cache_files(tmp_path / "cache") == []  # neither a complete file nor a .partial to resume
    monkeypatch.undo()
    again = cache.load_or_build(backbone, np.arange(40), STIMULI, loader)  # space freed: built afresh
    with torch.no_grad():
        torch.testing.assert_close(again.features, backbone(IMAGES))
    assert again.status == "built"


def test_cache_on_a_real_full_tmpfs(tmp_path):
    """The same on a real 128 KiB tmpfs, where HDF5 drops some failed writes without an error."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN; the monkeypatched tests cover the code path")
    try:
        code = ("import numpy as np, torch; from torch.utils.data import DataLoader; "
                "from encoders.backbones import build_backbone; from encoders.feature_cache import FeatureCache; "
                "FeatureCache._require_space = lambda *a: None; "  # let it run into the full disk
                "im = torch.randn(1000, 3, 32, 32); bb = build_backbone('tiny'); "
                f"FeatureCache('{mount / 'cache'}').load_or_build(bb, np.arange(1000), {{}}, "
                "lambda ids: DataLoader(im[torch.as_tensor(ids)], batch_size=64))")
        proc = run_cli("-c", code)
        assert proc.returncode == 1 and "StorageError" in proc.stderr
        assert "No space left on device" in proc.stderr or "did not reach the disk" in proc.stderr
        assert cache_files(mount / "cache") == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def failing_file_writes(monkeypatch, name: str) -> None:
    """Writes to ``<name>.tmp`` put some bytes on disk, then raise ENOSPC (a disk that fills up)."""
    from encoders import storage
    real = storage._RecordingFile.write

    def write(self, data):
        if Path(self.raw.name).name == name + ".tmp":
            real(self, bytes(data)[:100])
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.error = err
            raise err
        return real(self, data)

    monkeypatch.setattr(storage._RecordingFile, "write", write)


def test_atomic_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "head.pt"
    torch.save({"old": torch.zeros(3)}, path)
    old = path.read_bytes()
    failing_file_writes(monkeypatch, "head.pt")
    with pytest.raises(StorageError, match=rf"^{path}: cannot write \(No space left on device\)$"):
        atomic_write(path, lambda f: torch.save({"new": torch.ones(10_000)}, f))  # torch turns it into a RuntimeError
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["head.pt"]
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(old)
    failing_file_writes(monkeypatch, "last.ckpt")
    with pytest.raises(StorageError, match=rf"^{ckpt}: cannot write checkpoint \(No space left on device\)$"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(10_000)}}, ckpt)
    assert ckpt.read_bytes() == old and not list(tmp_path.glob("*.tmp"))


def test_an_unnamed_refused_write_names_the_file_or_the_run_directory(tmp_path):
    """OSErrors that reach train.py's main unnamed by our code (a logger's file, a library's temp file)."""
    import tempfile
    from train import storage_failure
    run_dir = tmp_path / "run"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "csv/metrics.csv"))
    try:
        try:
            raise full
        except OSError as err:
            raise RuntimeError("a library's wrapper") from err
    except RuntimeError as wrapped:
        assert str(storage_failure(wrapped, run_dir)) == f"{run_dir / 'csv/metrics.csv'}: No space left on device"
    staged = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(tempfile.gettempdir(), "tmpab12"))
    assert str(storage_failure(staged, run_dir)) == (f"{run_dir}: No space left on device while writing the run "
                                                     f"(at {os.path.join(tempfile.gettempdir(), 'tmpab12')})")
    assert storage_failure(OSError(errno.EIO, "I/O error"), run_dir) is None  # not a refusal: a traceback
    assert storage_failure(ValueError("bad value"), run_dir) is None


@pytest.mark.parametrize("name", ["predictions.npz", "head.pt", "metrics.json"])
def test_full_disk_while_writing_the_run_leaves_no_half_written_file(make_cfg, synthetic_root, tmp_path,
                                                                     monkeypatch, name):
    failing_file_writes(monkeypatch, name)
    run_dir = tmp_path / "run"
    with pytest.raises(StorageError) as err:
        train(make_cfg(FAST + [f"data.root={synthetic_root}", "data.synthetic=null"], run_dir), run_dir)
    assert str(err.value) == f"{run_dir / name}: cannot write (No space left on device)"
    assert user_error(err.value) is err.value  # train.py's main prints it as one line, exit 2
    assert not (run_dir / "metrics.json").exists()  # written last: a run without it is not taken for finished
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / name).exists()


# --------------------------------------------------------------------------- stimuli
def test_float_stimulus_brick_is_refused_naming_file_dataset_and_dtype(nsd):
    root, _ = nsd
    with h5py.File(stimuli_path(root), "r+") as f:
        images = f["imgBrick"][:]
        del f["imgBrick"]
        f["imgBrick"] = images.astype(np.float32)  # right shape and values, wrong type
    with pytest.raises(DataError) as err:
        nsd_files.StimulusBrick(stimuli_path(root))
    assert str(err.value) == (f"{stimuli_path(root)}: 'imgBrick' has dtype float32, expected uint8 (8-bit RGB, as NSD "
                              f"ships it); convert the images to uint8 0..255 first")
    with pytest.raises(DataError, match="'imgBrick' has dtype float32"):
        NSDDataModule(str(root)).setup()


def test_image_arrays_of_another_dtype_are_refused_by_the_transform():
    transform = build_backbone("tiny").transform
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert transform(image).shape[0] == 3
    for dtype in (np.float32, np.float64, np.uint16):
        with pytest.raises(ValueError, match=f"image array has dtype {np.dtype(dtype)}, expected uint8"):
            transform(image.astype(dtype))


def test_cli_float_brick_is_one_line_recorded_like_a_sweep_job_and_before_extraction(nsd, tmp_path):
    """A failed single run: one error line, exit 2, and failed.json + the traceback in train.log, as a
    sweep job records them; nothing extracted (no cache file)."""
    root, _ = nsd
    with h5py.File(stimuli_path(root), "r+") as f:
        images = f["imgBrick"][:]
        del f["imgBrick"]
        f["imgBrick"] = images.astype(np.float32)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_cli("train.py", "data=nsd", f"data.root={root}", "logger=none", f"hydra.run.dir={run_dir}",
                   f"feature_cache_dir={cache}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = f"error: {stimuli_path(root)}: 'imgBrick' has dtype float32, expected uint8"
    assert len(error_lines(proc)) == 1 and error_lines(proc)[0].startswith(expected)
    assert "Traceback" not in proc.stderr + proc.stdout
    record = json.loads((run_dir / "failed.json").read_text())
    assert record["type"] == "DataError" and "'imgBrick' has dtype float32" in record["error"]
    assert f"data.root={root}" in record["overrides"] and "Traceback" in record["traceback"]
    log = (run_dir / "train.log").read_text()
    assert "DataError" in log and "'imgBrick' has dtype float32" in log and "Traceback" in log
    assert not cache.exists() or not list(cache.iterdir())


# --------------------------------------------------------------------------- label tables
def test_ctab_parses_freesurfer_lines_comments_and_blanks(tmp_path):
    path = tmp_path / "floc-faces.mgz.ctab"
    path.write_text("#$Id: FreeSurferColorLUT.txt\n# No. Label Name: R G B A\n\n  0  Unknown  0 0 0 0\n"
                    "1   OFA       255 0 0 0\n2 FFA-1\n\t3\tFFA-2\t0 255 0 0\n-1 outside\n")
    assert nsd_files.read_ctab(path) == {1: "OFA", 2: "FFA-1", 3: "FFA-2"}


@pytest.mark.parametrize("line, problem", [
    ("2,FFA-1", "line 3 '2,FFA-1' is not '<label number> <name> ...'"),
    ("FFA-1 2", "line 3 'FFA-1 2' is not '<label number> <name> ...'"),
    ("2", "line 3 '2' is not '<label number> <name> ...'"),
    ("2.5 FFA-1", "line 3 '2.5 FFA-1' is not '<label number> <name> ...'"),
    ("1 FFA-1", "line 3 lists label 1 again ('OFA' before, now 'FFA-1')"),
])
def test_malformed_ctab_line_names_file_and_line(nsd, line, problem):
    """The damaged table is named, not a missing ROI ('no ROI named FFA-1' would point away from it)."""
    root, _ = nsd
    path = ctab_path(root, "floc-faces")
    path.write_text(f"0 Unknown\n1 OFA\n{line}\n3 FFA-2\n")
    with pytest.raises(DataError) as err:
        load_subject(root, 1, roi_files=["floc-faces"], rois=["FFA-1"])
    assert str(err.value) == f"{path}: {problem}" + (" (nor blank or a # comment)" if "is not" in problem else "")


def test_malformed_ctab_of_a_surface_space_is_named(nsd):
    root, _ = nsd
    write_space(root, 1, "fsaverage")
    path = ctab_path(root, "floc-faces", "fsaverage")
    path.write_text("0 Unknown\n1 OFA\n2,FFA-1\n")
    with pytest.raises(DataError, match=rf"^{path}: line 3 '2,FFA-1' is not"):
        load_subject(root, 1, roi_files=["floc-faces"], space="fsaverage")


def test_roi_label_missing_from_its_table_is_an_error(nsd):
    root, _ = nsd
    path = ctab_path(root, "floc-faces")
    path.write_text("0 Unknown\n1 OFA\n3 FFA-2\n")  # the file's voxels carry label 2
    roi = root / "nsddata/ppdata/subj01/func1pt8mm/roi/floc-faces.nii.gz"
    with pytest.raises(DataError) as err:
        load_subject(root, 1, roi_files=["floc-faces"])
    assert str(err.value).startswith(f"{roi}: holds label 2 (") and f"which its label table {path} does not list " \
                                                                    f"(it lists [1, 3])" in str(err.value)
    path.unlink()  # no .ctab: NSD's own table for floc-faces (1..5) applies
    grid = np.asarray(nib.load(roi).dataobj)
    grid[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(grid, np.eye(4)), roi)
    with pytest.raises(DataError, match=r"holds label 9 \(1 positions\), which its label table NSD's table for "
                                        r"'floc-faces' \(there is no .*floc-faces\.mgz\.ctab\) does not list"):
        load_subject(root, 1, roi_files=["floc-faces"])


def test_dlabel_value_missing_from_its_label_table_is_an_error(tmp_path):
    models = (cifti2.BrainModelAxis.from_surface(np.arange(5), 5, "CortexLeft")
              + cifti2.BrainModelAxis.from_surface(np.arange(5), 5, "CortexRight"))
    table = {0: ("???", (1.0, 1.0, 1.0, 0.0)), 1: ("FFA", (1.0, 0.0, 0.0, 1.0))}
    values = np.array([[0, 1, 1, 0, 0, 0, 2, 2, 2, 0]], dtype=np.float32)
    path = tmp_path / "floc-faces.dlabel.nii"
    nib.save(cifti2.Cifti2Image(values, header=(cifti2.LabelAxis(["floc-faces"], table), models)), path)
    with pytest.raises(DataError) as err:
        read_dlabel(path, 10)
    assert str(err.value) == (f"{path}: map 0 holds label 2 (3 grayordinates), which its label table does not list "
                              f"(it lists [0, 1])")
    values[0, 6:9] = 0
    nib.save(cifti2.Cifti2Image(values, header=(cifti2.LabelAxis(["floc-faces"], table), models)), path)
    masks, _ = read_dlabel(path, 10)
    assert sorted(masks) == ["FFA"] and masks["FFA"].sum() == 2


# --------------------------------------------------------------------------- sweeps
def test_sweep_with_failed_jobs_exits_1_saying_how_many(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", "data=nsd", f"data.root={tmp_path / 'no_nsd'}", "logger=none", "seed=0,1",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: 2 job(s) of the sweep failed (first: 0_tiny_linear: "
                                                   "DataError: ")
    assert lines[0].endswith(f"python analyze.py analysis=summary sweep_dir={sweep}")
    assert all((job / "failed.json").exists() for job in sweep.iterdir() if job.is_dir())
