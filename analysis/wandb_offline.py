"""Read W&B offline run files (`<run_dir>/wandb/offline-run-*/run-<id>.wandb`) without a network.

wandb 0.31 ships the record definitions (`wandb.proto.wandb_internal_pb2`) but no reader; the file
is a LevelDB-style log (32 KiB blocks; records of crc32, length, type, then a protobuf `Record`)
after a 7-byte header (":W&B", magic 0xBEE1, version). `OfflineRun` offers the attributes of a
`wandb.Api()` run that the analysis uses (id, name, group, job_type, tags, config, summary,
history()), so the W&B loader is tested on real files written by real wandb.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[bytes]:
    """The serialized records of a .wandb file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        elif kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK  # zero padding to the end of the block


def _items(items) -> dict:
    """Items {key or nested_key path: JSON value} rebuilt as a (nested) dict."""
    out: dict = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


class OfflineRun:
    """One offline W&B run file, with the attributes of a `wandb.apis.public.Run` the analysis reads."""

    def __init__(self, path: str | Path):
        from wandb.proto import wandb_internal_pb2

        self.path = Path(path)
        self.config, self.summary, self._history = {}, {}, []
        self.id = self.name = self.group = self.job_type = self.project = None
        self.tags: list[str] = []
        for raw in records(self.path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                self.id, self.name, self.group, self.job_type = run.run_id, run.display_name, run.run_group, run.job_type
                self.project, self.tags = run.project, list(run.tags)
                self.config.update({k: v["value"] if isinstance(v, dict) and "value" in v else v
                                    for k, v in _items(run.config.update).items()})
            elif kind == "config":
                self.config.update({k: v["value"] if isinstance(v, dict) and "value" in v else v
                                    for k, v in _items(record.config.update).items()})
            elif kind == "history":
                self._history.append(_items(record.history.item))
            elif kind == "summary":
                self.summary.update(_items(record.summary.update))
        self.config = {k: v for k, v in self.config.items() if not k.startswith("_")}

    def history(self, keys: list[str] | None = None):
        """Logged rows as a DataFrame (`_step` is the training step), optionally only some keys."""
        import pandas as pd

        frame = pd.DataFrame(self._history)
        return frame if keys is None else frame[[k for k in ["_step", *keys] if k in frame]]


def offline_runs(*dirs: str | Path) -> list[OfflineRun]:
    """Every offline W&B run under the given folders (sweep or run directories)."""
    return [OfflineRun(p) for d in dirs for p in sorted(Path(d).rglob("offline-run-*/run-*.wandb"))]
