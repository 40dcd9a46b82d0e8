"""Read what W&B wrote for an offline run: its transaction log (``run-<id>.wandb``), with wandb's own protobuf
records. wandb 0.31 ships no reader for it and writes neither files/config.yaml nor files/wandb-summary.json
offline, so the log is parsed here: a 7-byte header (":W&B", magic, version), then LevelDB-style 32 KiB
blocks of chunks (crc32 4 B, length 2 B, type 1 B: 1 full, 2 first, 3 middle, 4 last)."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path


def read_records(path: Path):
    """Every record of a .wandb file, in order (wandb.proto Record messages)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        if space < 7:
            pos += space
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _items(items) -> dict:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json) if item.value_json else None
    return out


@dataclass
class OfflineRun:
    """An offline W&B run as written: its run record (id, group, job_type, display_name, tags), config (nested
    values as written: {"backbone": {"name": ..., ...}, ...}), summary and history rows."""

    directory: Path
    run: object
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def media(self, kind: str) -> list[Path]:
        """Files under files/media/<kind>/ (images, table), sorted."""
        return sorted((self.directory / "files" / "media" / kind).rglob("*.*"))


def read_offline_run(directory: Path) -> OfflineRun:
    """The offline run in ``directory`` (``.../wandb/offline-run-<time>-<id>``), after the run finished.

    ``run.finish()`` returns before wandb's service process has necessarily written the last records (the
    flaky StopIteration / missing keys seen earlier), so this first shuts the service down
    (``wandb.teardown()``: it waits for every record to be written); the next ``wandb.init`` starts a new one.
    No sleeping, no retries."""
    import wandb

    wandb.teardown()
    directory = Path(directory)
    logs = sorted(directory.glob("run-*.wandb"))
    assert len(logs) == 1, f"{directory}: expected one run-*.wandb, found {[p.name for p in logs]}"
    out = OfflineRun(directory, None)
    for record in read_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run = record.run
            out.config.update({k: v.get("value", v) if isinstance(v, dict) else v
                               for k, v in _items(record.run.config.update).items()})
        elif kind == "config":
            out.config.update({k: v.get("value", v) if isinstance(v, dict) else v
                               for k, v in _items(record.config.update).items()})
        elif kind == "summary":
            out.summary.update(_items(record.summary.update))
        elif kind == "history":
            out.history.append(_items(record.history.item))
    assert out.run is not None, f"{logs[0]}: no run record"
    return out
