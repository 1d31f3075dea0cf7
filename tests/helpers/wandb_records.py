"""A small reader for wandb's offline transaction log (``run-<id>.wandb``), for tests.

wandb 0.31 keeps an offline run's history, summary, config and metric definitions only in this
file: a 7-byte header starting ``:W&B``, then LevelDB-log records in 32 KiB blocks. Each record
has a 7-byte header (crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last);
a block tail shorter than 7 bytes is padding. An assembled record is a protobuf
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = 7
BLOCK = 32 * 1024
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> Iterator[pb.Record]:
    """Every record of a ``.wandb`` file, in write order."""
    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path}: not a wandb transaction log (header {data[:7]!r})")
    pos, parts = FILE_HEADER, []
    while pos + RECORD_HEADER <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER:  # block tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        pos += RECORD_HEADER
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 0 and length == 0:  # zero-filled rest of the last block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        parts.append(chunk)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _key(item: pb.HistoryItem | pb.SummaryItem | pb.ConfigItem) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What an offline run recorded: history rows, final summary, config, metric definitions,
    artifacts, and the run record (name, project, group, tags)."""

    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: dict[str, pb.MetricRecord] = field(default_factory=dict)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    run: pb.RunRecord | None = None

    def history_keys(self) -> set[str]:
        return {key for row in self.history for key in row}


def read_offline_run(path: str | Path) -> OfflineRun:
    """Parse ``run-<id>.wandb`` (``path``) or the single one under an ``offline-run-*`` folder."""
    path = Path(path)
    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    run = OfflineRun()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "run":
            run.run = record.run
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
    return run
