"""Config mistakes and damaged run directories (issue 15): one ``error:`` line naming the key or the file,
exit code 2, before the backbone is built or data is read, and nothing already written changed.

The command-line tests run train.py's and analyze.py's ``main`` in this process, inside the same
``one_line_hydra_errors`` context their ``__main__`` uses (Hydra composes, launches and calls back exactly as
from a shell); one subprocess test per entry point checks the wiring end to end.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.model_selection import GroupKFold

from encoders import ridge
from encoders.config_checks import ConfigError, check_config, check_head_training_set, resolved_config
from encoders.heads import MLPHead, RidgeHead
from encoders.hydra_errors import one_line_hydra_errors
from encoders.resume import RunDirInUse, check_run_dir, other_run
from encoders.ridge import RidgeCV
from encoders.run_dir import RunDir, RunFileError
from tests.conftest import REPO

FAST = ["experiment=demo", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")


def data_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.synthetic=null"]


# --------------------------------------------------------------------------- running the entry points in-process
def drop_file_handlers() -> None:
    """Hydra's job logging leaves a FileHandler on the run's train.log; a real process ends there."""
    for handler in list(logging.root.handlers):
        if isinstance(handler, logging.FileHandler):
            logging.root.removeHandler(handler)
            handler.close()


def run_main(script: str, args: list[str], capsys) -> tuple[int, list[str]]:
    """``python <script> args`` in this process: (exit code, stderr lines); stdout is left in capsys."""
    import analyze
    import train

    module = {"train.py": train, "analyze.py": analyze}[script]
    capsys.readouterr()
    saved = sys.argv
    sys.argv = [script, f"--config-path={REPO / 'conf'}", *args]
    code = 0
    try:
        with one_line_hydra_errors():
            module.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
        drop_file_handlers()
    captured = capsys.readouterr()
    sys.stdout.write(captured.out)  # for the caller's capsys.readouterr().out
    return code, [line for line in captured.err.splitlines() if line.strip()]


def error_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("error:")]


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (hidden ones, .hydra/, included)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory):
    """A run finished through train.py's command line (with its .hydra/, train.log, csv/ and checkpoints)."""
    base = tmp_path_factory.mktemp("finished")
    run = base / "run"
    args = [*FAST, "logger=csv", *data_overrides(synthetic_root), f"feature_cache_dir={base / 'cache'}"]

    class Capture:  # run_main wants capsys; here a module-scoped stand-in
        def readouterr(self):
            return type("Out", (), {"err": "", "out": ""})()

    code, _ = run_main("train.py", [*args, f"hydra.run.dir={run}"], Capture())
    assert code == 0 and (run / "metrics.json").exists() and (run / ".hydra" / "overrides.yaml").exists()
    assert (run / "train.log").exists()
    return run, args  # args without hydra.run.dir


# --------------------------------------------------------------------------- 1. a refused rerun touches nothing
def test_refused_rerun_leaves_the_run_directory_byte_identical(finished_run, capsys, monkeypatch):
    run, args = finished_run
    before = file_hashes(run)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "metrics.json"} <= before.keys()
    code, lines = run_main("train.py", [*args, f"hydra.run.dir={run}", "optimizer.lr=0.01"], capsys)
    assert code == 2, lines
    assert lines == error_lines(lines) and len(lines) == 1
    assert lines[0].startswith(f"error: {run}: holds a finished run with another config (optimizer.lr: 0.001 -> 0.01)")
    assert "nothing there was changed" in lines[0] and "resume=false" in lines[0]
    assert file_hashes(run) == before  # .hydra/ (the original command line) and train.log included
    assert not (run / "failed.json").exists()

    # the same as a sweep job (its folder holds the finished run): refused, and Hydra's rewrite of .hydra/ undone
    monkeypatch.chdir(run.parent.parent)  # a relative sweep dir, as the default outputs/multirun/...
    code, lines = run_main("train.py", ["-m", *args, "optimizer.lr=0.01,0.02", f"hydra.sweep.dir={run.parent.name}",
                                        f"hydra.sweep.subdir={run.name}"], capsys)
    assert code == 1, lines
    assert error_lines(lines)[-1].startswith("error: 2 job(s) of the sweep were refused (first: run: ")
    assert sum(line.startswith(f"error: {run}: holds a finished run") for line in lines) == 2
    assert file_hashes(run) == before


def test_a_damaged_config_of_a_finished_run_is_named_and_the_rerun_refused(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    (run / "config.yaml").write_text("seed: [0\n")  # truncated YAML
    before = file_hashes(run)
    code, lines = run_main("train.py", [*finished_run[1], f"hydra.run.dir={run}"], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {run / 'config.yaml'}: cannot be read as YAML (")
    assert file_hashes(run) == before


def test_the_run_directory_decision(make_cfg, tmp_path):
    """Resume the same config, refuse another (naming old and new values), start afresh with resume=false."""
    run = tmp_path / "run"
    cfg = resolved_config(make_cfg(["experiment=demo"], run_dir=run))
    check_run_dir(cfg, run)  # nothing there
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    check_run_dir(cfg, run)  # a config but no run (e.g. a failed attempt): may be overwritten
    (run / "metrics.json").write_text("{}")
    check_run_dir(cfg, run)  # a finished run of this very config
    other = {**cfg, "seed": 3, "optimizer": {**cfg["optimizer"], "lr": 0.5}, "logger": None}
    assert other_run(other, run) == [("optimizer.lr", 0.001, 0.5), ("seed", 0, 3)]  # logger may change
    with pytest.raises(RunDirInUse, match=r"holds a finished run with another config \(optimizer.lr: 0.001 -> 0.5, "
                                          r"seed: 0 -> 3\)"):
        check_run_dir(other, run)
    check_run_dir({**other, "resume": False}, run)


# --------------------------------------------------------------------------- 2. the whole config, up front
BAD = [
    (["head=ridge", "head.cv=abc"], "head.cv must be an int >= 2 (the number of folds), a scikit-learn splitter"),
    (["head=ridge", "head.cv=1"], "head.cv must be an int >= 2"),
    (["head=ridge", "head.cv=[[[0,1],[1,2]]]"], "head.cv must be an int >= 2"),
    (["head=ridge", "head.cv={_target_:sklearn.model_selection.GroupKFoldd}"],
     "head.cv._target_=sklearn.model_selection.GroupKFoldd: sklearn.model_selection has no GroupKFoldd"),
    (["head=ridge", "head.cv={_target_:sklearn.model_selection.GroupKFold,n_splits:x}"], "head.cv: "),
    (["head=ridge", "head.alphas=[-1,1]"], "head.alphas must be a non-empty list of finite, non-negative numbers"),
    (["head=ridge", "head.alphas=[]"], "head.alphas must be a non-empty list"),
    (["head=ridge", "head.alphas=abc"], "head.alphas must be a non-empty list"),
    (["head=ridge", "head.score=foo"], "head.score must be 'r2' or 'corr', got 'foo'"),
    (["head=mlp", "head.hidden=[-3]"], "head.hidden must be a list of positive layer widths"),
    (["head=mlp", "head.dropout=1.5"], "head.dropout must be a number in [0, 1)"),
    (["+head.foo=1"], "head.foo: not an option of encoders.heads.LinearHead (it takes none)"),
    (["head=mlp", "+head.hiden=[4]"], "head.hiden: not an option of encoders.heads.MLPHead (did you mean hidden? "
                                      "its options: hidden, dropout, activation)"),
    (["data.val_fraction=1.0"], "data.val_fraction must be a number strictly between 0 and 1"),
    (["data.val_fraction=0"], "data.val_fraction must be a number strictly between 0 and 1"),
    (["data.batch_size=0"], "data.batch_size must be a positive int, got 0"),
    (["data.num_workers=-1"], "data.num_workers must be an int >= 0"),
    (["data.subject=0"], "data.subject must be a positive int"),
    (["data.sessions=[0]"], "data.sessions must be null (every session) or a non-empty list of session numbers"),
    (["data.test_set=all"], "data.test_set must be one of"),
    (["data=nsd"], "data.root needs a value (it is ??? in the config): give data.root=..."),
    (["data=nod", "data.root=/x", "data.test_fraction=2"],
     "data.test_fraction must be a number strictly between 0 and 1"),
    (["experiment=demo_video", "head=ridge", "head.shuffle_folds=true"],
     "head.shuffle_folds=true would shuffle the TRs"),
    (["features=foo"], "features must be one of cached, precompute, online, got 'foo'"),
    (["trainer.precision=bf16-true"], "trainer.precision=bf16-true is not supported"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch: not an option of lightning.Trainer (did you mean max_epochs?"),
    (["trainer.devices=abc"], "trainer (lightning.Trainer): "),
    (["callbacks.early_stopping.mode=up"], "callbacks.early_stopping (lightning.pytorch.callbacks.EarlyStopping): "
                                           "`mode` can be min, max, got up"),
    (["optimizer.lr=-1"], "optimizer (torch.optim.AdamW): Invalid learning rate: -1"),
    (["scheduler.gamma=abc"], "scheduler (torch.optim.lr_scheduler.ExponentialLR): "),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_config_mistakes_are_named_before_anything_heavy(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(resolved_config(make_cfg(overrides)))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    [], ["head=mlp"], ["head=ridge"], ["head=ridge", "head.alphas=[0.1,10]", "head.score=corr"],
    ["head=ridge", "head.cv={_target_:sklearn.model_selection.GroupKFold,n_splits:3}"],
    ["head=ridge", "head.cv=[[[0,1],[2,3]],[[2,3],[0,1]]]"], ["experiment=demo_video", "head=ridge"],
    ["experiment=demo_nod"], ["trainer=ddp_cpu"], ["precision=bf16-mixed"], ["logger=wandb"], ["scheduler=none"],
])
def test_valid_configs_pass(make_cfg, overrides):
    deterministic = torch.are_deterministic_algorithms_enabled()
    check_config(resolved_config(make_cfg(overrides)))
    # the throwaway Trainer's global flags are put back: extraction runs as it would without the check
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_options_are_checked_where_they_live():
    """Library users get the same checks without Hydra: the head classes, RidgeCV, the datamodules."""
    with pytest.raises(ValueError, match=r"^cv must be an int >= 2"):
        RidgeCV(cv="abc")
    with pytest.raises(ValueError, match=r"^alphas must be a non-empty list of finite, non-negative numbers"):
        RidgeCV(alphas=[1.0, float("nan")])
    with pytest.raises(ValueError, match=r"^head\.score must be 'r2' or 'corr'"):
        RidgeHead.check_options(score="mse", prefix="head.")
    with pytest.raises(ValueError, match=r"^MLPHead: dropout must be a number in \[0, 1\)"):
        MLPHead(4, 3, dropout=-0.1)
    pairs = list(GroupKFold(3).split(np.zeros((9, 1)), groups=np.arange(9) % 3))  # tuples of int arrays
    for cv in (5, GroupKFold(3), pairs, iter(pairs)):
        ridge.check_cv(cv)
    from datamodules.nsd import NSDDataModule
    with pytest.raises(ValueError, match=r"^data\.batch_size must be a positive int, got 0"):
        NSDDataModule("/nowhere", batch_size=0)  # reads nothing: fails before any file is opened


def test_cv_against_the_training_split():
    """More folds than training images, a splitter that cannot split them, pairs past the end: named as head.cv."""
    ids = np.repeat(np.arange(40), 3)  # 40 images, 3 single trials each
    head = {"_target_": "encoders.heads.RidgeHead", "_partial_": True, "cv": 41, "shuffle_folds": True}
    with pytest.raises(ConfigError, match=r"^head\.cv=41 cannot split the training set \(120 samples, 40 distinct "
                                          r"stimuli\): need n_folds <= the number of groups"):
        check_head_training_set(head, ids)
    check_head_training_set({**head, "cv": 40}, ids)
    splitter = {"_target_": "sklearn.model_selection.GroupKFold", "n_splits": 50}
    with pytest.raises(ConfigError, match=r"^head\.cv=GroupKFold cannot split the training set"):
        check_head_training_set({**head, "cv": splitter}, ids)
    with pytest.raises(ConfigError, match=r"indices outside \[0, 120\)"):
        check_head_training_set({**head, "cv": [[[0, 1], [200]]]}, ids)
    check_head_training_set({"_target_": "encoders.heads.LinearHead", "_partial_": True}, ids)  # nothing to check


def test_too_many_folds_stop_after_the_split_before_extraction(make_cfg, synthetic_root, tmp_path):
    from train import train
    cache = tmp_path / "feature_cache"  # make_cfg's feature_cache_dir
    with pytest.raises(ConfigError, match=r"^head\.cv=100000 cannot split the training set \(\d+ samples"):
        train(make_cfg([*FAST, "logger=none", *data_overrides(synthetic_root), "head=ridge", "head.cv=100000"]),
              tmp_path / "run")
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_config_mistakes_stop_before_the_backbone_and_the_data(make_cfg, synthetic_root, tmp_path, monkeypatch):
    from datamodules.nsd import NSDDataModule
    from encoders import backbones
    from train import train
    calls = []
    monkeypatch.setattr(backbones, "build_backbone", lambda *a, **k: calls.append("backbone"))
    monkeypatch.setattr(NSDDataModule, "setup", lambda self, stage=None: calls.append("data"))
    run = tmp_path / "run"
    for overrides in (["head=ridge", "head.score=foo"], ["data.val_fraction=1.0"], ["data.batch_size=0"]):
        with pytest.raises(ConfigError):
            train(make_cfg([*FAST, "logger=none", *data_overrides(synthetic_root), *overrides], run), run)
    assert calls == [] and not run.exists()  # nothing built, read or written (not even config.yaml)


def test_cli_config_mistake_is_one_line_exit_2_before_extraction(synthetic_root, tmp_path):
    """End to end through a shell: one line, exit 2, the failure recorded like a sweep job's, no cache file."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.run([sys.executable, "train.py", *FAST, "logger=none", *data_overrides(synthetic_root),
                           "head=ridge", "head.cv=abc", f"hydra.run.dir={run}", f"feature_cache_dir={cache}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: head.cv must be an int >= 2 (the number of folds), a scikit-learn splitter (e.g. {_target_: "
        "sklearn.model_selection.GroupKFold, n_splits: 5}) or a list of [train indices, test indices] pairs; got 'abc'"]
    assert json.loads((run / "failed.json").read_text())["type"] == "ConfigError"
    assert not cache.exists()


# --------------------------------------------------------------------------- 3. Hydra's own mistakes
@pytest.mark.parametrize("script, args, expected", [
    ("train.py", ["head=lineer"],
     "error: head=lineer: there is no head config 'lineer' (did you mean linear? choose from: linear, mlp, ridge)"),
    ("train.py", ["head.foo=1"], "error: head.foo=1: head has no key 'foo' (it has none; +head.foo=1 would add it)"),
    ("train.py", ["head=ridge", "head.scor=r2"],
     "error: head.scor=r2: head has no key 'scor' (did you mean score? its keys: alphas, cv, score, shuffle_folds, "
     "seed, voxel_batch; +head.scor=r2 would add it)"),
    ("train.py", ["-m", "head=linear,lineer"],
     "error: head=lineer: there is no head config 'lineer' (did you mean linear? choose from: linear, mlp, ridge)"),
    ("train.py", ["-m", "head=linear,ridge", "head.hidden=[4]"], "error: head.hidden=[4]: head has no key 'hidden'"),
    ("train.py", ["hydra/launcher=jobblib"],
     "error: hydra/launcher=jobblib: there is no hydra/launcher config 'jobblib' (did you mean joblib? choose from: "
     "basic, joblib,"),
    ("train.py", ["head.cv=[1,"], "error: head.cv=[1,: not a valid override (no viable alternative at input '[1,'"),
    ("analyze.py", ["analysis=sumary", "run_dir=/nowhere"],
     "error: analysis=sumary: there is no analysis config 'sumary' (did you mean summary? choose from: brainsail, "
     "clip_msm, localizer, maps, report, summary, wen2018)"),
    ("analyze.py", ["analysis.foo=1", "run_dir=/nowhere"], "error: analysis.foo=1: analysis has no key 'foo'"),
])
def test_hydra_mistakes_are_one_line_naming_the_choices(script, args, expected, tmp_path, capsys):
    code, lines = run_main(script, [*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 's'}"],
                           capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob(".hydra"))  # no job was started


def test_hydra_help_and_cfg_still_work(capsys):
    code, lines = run_main("train.py", ["--help"], capsys)
    assert code == 0 and not error_lines(lines) and "Powered by Hydra" in capsys.readouterr().out
    code, lines = run_main("train.py", ["--cfg", "job", "head=ridge"], capsys)
    assert code == 0 and not error_lines(lines) and "voxel_batch: auto" in capsys.readouterr().out


def test_cli_hydra_mistake_through_a_shell():
    proc = subprocess.run([sys.executable, "train.py", "head=lineer"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: head=lineer: there is no head config 'lineer' (did you mean linear? choose from: linear, mlp, ridge)"]


# --------------------------------------------------------------------------- 4. damaged files of a run directory
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("name, read, kind", [
    ("metrics.json", lambda run: run.metrics, "JSON"),
    ("run.json", lambda run: run.info, "JSON"),
    ("split.json", lambda run: run.split, "JSON"),
    ("config.yaml", lambda run: run.config, "YAML"),
    ("voxel_metrics.npz", lambda run: run.voxels(), "a .npz archive"),
    ("predictions.npz", lambda run: run.predictions("test"), "a .npz archive"),
    ("head.pt", lambda run: run.head_state(), "a torch file"),
    ("csv/metrics.csv", lambda run: run.learning_curve(), "Lightning's CSV log"),
])
def test_a_damaged_run_file_is_named(finished_run, tmp_path, name, read, kind):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    assert read(RunDir(run)) is not None  # intact: reads
    if name == "config.yaml":
        (run / name).write_text("seed: [0\n")
    elif name.endswith(".csv"):
        (run / name).write_text("epoch,val/r_mean\n0,0.1\n1,0.\x00\x01\n")
    else:
        truncate(run / name)
    with pytest.raises(RunFileError) as err:
        read(RunDir(run))
    message = str(err.value)
    assert message.startswith(f"{run / name}: cannot be read as {kind} (") and "\n" not in message
    assert message.endswith("; is it truncated or corrupt?")
    (run / name).write_text("[1, 2]" if name.endswith(".json") else "- 1\n")
    if name.endswith((".json", ".yaml")):
        with pytest.raises(RunFileError, match=r"holds a list, not the dict a run writes there"):
            read(RunDir(run))


def test_analyze_names_a_truncated_metrics_file(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    truncate(run / "metrics.json", 0.3)
    code, lines = run_main("analyze.py", ["analysis=summary", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'a'}"],
                           capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {run / 'metrics.json'}: cannot be read as JSON (")
