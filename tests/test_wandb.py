"""W&B runs a dashboard can use, checked by reading what W&B wrote offline (tests/wandb_records.py); an online
run without a network falls back to offline in a bounded time with one warning line; analyses refer to the
encoder's run instead of making another."""
import csv
import http.server
import json
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from encoders.run_dir import RunDir
from encoders.wandb_mode import WandbModeError, effective_mode, forget_unreachable, probe, wandb_mode
from encoders.wandb_run import init_run, run_mode
from tests.wandb_records import read_offline_run

OVERRIDES = ["experiment=demo", "trainer.enable_progress_bar=false", "logger=csv_wandb", "head=ridge", "backbone=tiny",
             "data.synthetic=null", "logger.wandb.probe_timeout=2"]


def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch):
    """An online W&B setup (API key, WANDB_MODE=online) whose server cannot be reached: WANDB_BASE_URL points at
    a closed local port, as on a machine without a network."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    forget_unreachable()
    yield
    forget_unreachable()


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """One training run with logger=csv_wandb, asked to log online on a machine without a network; a PNG waits
    in its maps/ folder (where brain-map pictures go). Returns (RunDir, the warnings logged, the info lines)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from tests.conftest import REPO
    from train import train

    base = tmp_path_factory.mktemp("wandb_train")
    run_dir = base / "run"
    (run_dir / "maps").mkdir(parents=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.imsave(run_dir / "maps" / "test_r.png", np.arange(64.0).reshape(8, 8))
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "online")
    mp.setenv("WANDB_API_KEY", "x" * 40)
    mp.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    forget_unreachable()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            cfg = compose(config_name="train", return_hydra_config=True,
                          overrides=[*OVERRIDES, f"data.root={synthetic_root}", f"feature_cache_dir={base / 'cache'}"])
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        train(cfg, run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
        GlobalHydra.instance().clear()
        mp.undo()
        forget_unreachable()
    return RunDir(run_dir), records


def test_training_run_carries_config_name_group_summary_table_and_figures(trained):
    run, records = trained
    record = run.wandb
    assert record["mode"] == "offline" and record["job_type"] == "train" and record["project"] == "brainprobe"
    assert record["group"] == "demo"  # experiment=demo (else the sweep directory, else synthetic-subj1)
    assert record["name"] == f"tiny[{','.join(run.info['layers'])}]-ridge-synthetic-subj1"
    written = read_offline_run(Path(record["dir"]))
    assert written.run.run_id == record["id"] and written.run.run_group == "demo"
    assert written.run.job_type == "train" and written.run.display_name == record["name"]
    assert list(written.run.tags) == ["tiny", "ridge", "synthetic", "subj1"]

    # The resolved config, nested, plus what was built.
    config = written.config
    assert config["backbone"]["name"] == "tiny" and config["head"]["cv"] == 5 and config["data"]["subject"] == 1
    assert config["metrics"]["nc_threshold"] == 10 and config["data"]["root"] == run.config["data"]["root"]
    assert config["encoder"] == {"backbone": "tiny", "layers": run.info["layers"], "head": "ridge",
                                 "dataset": "synthetic", "subject": 1, "n_features": run.info["n_features"],
                                 "n_voxels": run.metrics["test"]["n_voxels"]}

    # The summary: every number of metrics.json (overall and per ROI), sizes, time, extraction speed.
    summary, metrics = written.summary, run.metrics
    for split in ("test", "val"):
        for key in ("r_mean", "r_median", "r2_mean", "r2_median", "nc_r2_mean", "nc_r2_median",
                    "nc_r2_mean_reliable", "n_reliable", "n_voxels", "nc_threshold"):
            assert summary[f"{split}/{key}"] == pytest.approx(metrics[split][key]), (split, key)
    for roi, block in metrics["test"]["rois"].items():
        assert summary[f"test/roi/{roi}/nc_r2_median"] == pytest.approx(block["nc_r2_median"])
        assert summary[f"test/roi/{roi}/n_reliable"] == block["n_reliable"]
    assert summary["n_features"] == run.info["n_features"] and summary["n_voxels"] == metrics["test"]["n_voxels"]
    assert summary["wall_time_s"] == pytest.approx(run.info["wall_time_s"])
    extraction = run.info["features"]["extraction"]
    assert extraction["images"] == len({i for s in ("train", "val", "test") for i in run.split[s]})
    assert summary["extraction_images_per_s"] == pytest.approx(extraction["images_per_s"]) and extraction["images_per_s"] > 0

    # The per-ROI table and the figures: the per-ROI bars and every PNG of maps/.
    tables = written.media("table")
    assert [p.name.split("_")[0] for p in tables] == ["roi"]
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["split", "roi"] and "nc_r2_mean_reliable" in table["columns"]
    assert len(table["data"]) == sum(len(metrics[s]["rois"]) for s in ("val", "test"))
    images = {p.relative_to(written.directory / "files" / "media" / "images").parts[0] for p in written.media("images")}
    assert images == {"figures", "maps"}
    assert summary["figures/roi_bars/_type"] == summary["maps/test_r/_type"] == "image-file"

    # No network: one warning line, the run finished offline, and the line that uploads it.
    warnings = [r for r in records if r.levelno == logging.WARNING and r.name == "brainprobe.wandb"]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    assert any(r.getMessage().endswith(f"wandb sync {record['dir']}") for r in records if r.levelno == logging.INFO)


@dataclass
class ToyOptions:
    wandb: str = "auto"
    out_subdir: str = "toy"

    def as_dict(self):
        return {"wandb": self.wandb, "out_subdir": self.out_subdir}


def test_an_analysis_refers_to_the_encoder_run_instead_of_making_another(trained, tmp_path):
    from analyses.jobs.base import Job

    class ToyJob(Job):  # unnamed: not registered
        def compute(self, run):
            return {"score": 0.25}

        def write(self, run, result):
            out = self.make_out_dir(run)
            with open(out / "table.csv", "w", newline="") as f:
                csv.writer(f).writerows([["roi", "score"], ["FFA-1", 0.25]])
            return [out / "table.csv"]

        def wandb_summary(self, result):
            return result

    ToyJob.name = "toy"
    run, _ = trained
    before = sorted((run.path / "wandb").glob("offline-run-*"))
    job = ToyJob(ToyOptions())  # wandb=auto: the run trained with W&B
    job.process(run)
    new = [d for d in sorted((run.path / "wandb").glob("offline-run-*")) if d not in before]
    assert len(new) == 1 and job.last_wandb_dir == str(new[0])
    written = read_offline_run(new[0])
    assert written.run.job_type == "analysis" and written.run.run_group == run.wandb["group"]
    assert written.run.display_name == f"toy · {run.wandb['name']}" and "toy" in list(written.run.tags)
    assert written.config["encoder_run"]["id"] == run.wandb["id"] and written.config["analysis"] == "toy"
    assert written.summary["toy/score"] == 0.25
    assert run.wandb["id"] != written.run.run_id


def test_no_network_falls_back_offline_within_the_bound(no_network, tmp_path, caplog):
    """Connection refused (a closed port) and no answer (a listener that never replies, 0.3 s bound): the run
    starts offline, with one warning line naming the server; later runs of the process neither ask nor warn again."""
    url = f"http://127.0.0.1:{closed_port()}"
    assert probe(url, 2.0) is not None
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert probe(silent_url, 0.3) == "no answer within 0.3 s"
    with caplog.at_level(logging.WARNING, logger="brainprobe.wandb"):
        wb = init_run(directory=tmp_path, project="p", group="g", name="n", job_type="train", probe_timeout=0.5)
        assert run_mode(wb) == "offline"
        wb.finish()
        again = init_run(directory=tmp_path, project="p", group="g", name="n2", job_type="train", probe_timeout=0.5)
        again.finish()
    lines = [r.getMessage() for r in caplog.records if r.name == "brainprobe.wandb"]
    assert len(lines) == 1 and "unreachable" in lines[0] and "logging offline" in lines[0]  # once per process
    assert effective_mode(0.5).mode == "offline"


def test_a_server_that_answers_but_is_not_wandb(monkeypatch, tmp_path, caplog):
    """Any HTTP answer (here 404 from a local server) counts: the decision stays online. wandb then cannot start
    the run (the server is no W&B): the run falls back to offline with one warning line, not a traceback."""
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        forget_unreachable()
        decision = effective_mode(5.0, requested="online")
        assert decision.mode == "online" and decision.warning is None
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        with caplog.at_level(logging.WARNING, logger="brainprobe.wandb"):
            wb = init_run(directory=tmp_path, project="p", group="g", name="n", job_type="train", mode="online",
                          init_timeout=10)
            assert run_mode(wb) == "offline"
            wb.finish()
        lines = [r.getMessage() for r in caplog.records if r.name == "brainprobe.wandb"]
        assert len(lines) == 1 and lines[0].startswith("W&B could not start an online run (")
    finally:
        server.shutdown()
        forget_unreachable()


def test_wandb_mode_values(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "offline"  # no key: never waits on a network
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    for value, mode in (("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled"), ("Online", "online")):
        monkeypatch.setenv("WANDB_MODE", value)
        assert wandb_mode() == mode
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(WandbModeError, match="WANDB_MODE='sometimes'"):
        wandb_mode()
    # An empty WANDB_MODE is unset (wandb itself refuses it with a pydantic traceback): no key -> offline.
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "")
    wb = init_run(directory=tmp_path, project="p", group="g", name="n", job_type="train")
    assert run_mode(wb) == "offline"
    wb.finish()


def test_train_refuses_an_unknown_wandb_mode_in_one_line(make_cfg, monkeypatch, tmp_path):
    from train import ConfigError, start_run

    monkeypatch.setenv("WANDB_MODE", "sometimes")
    cfg = make_cfg(["logger=wandb"])
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes' is not a W&B mode"):
        start_run(cfg, tmp_path / "run")
