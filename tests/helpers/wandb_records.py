"""What an offline W&B run wrote, read back from its run folder (`wandb/offline-run-*/run-<id>.wandb`). W&B ships
no reader for it since its core moved to Go: the file is a 7-byte header, then protobuf `Record`s framed as in
LevelDB's log (32 KiB blocks; each chunk: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER, CHUNK = 32768, 7, 7


def records(path: Path) -> list:
    data, position, pending, found = path.read_bytes(), HEADER, b"", []
    while position + CHUNK <= len(data):
        if BLOCK - position % BLOCK < CHUNK:  # the block's tail is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK])
        pending += data[position + CHUNK:position + CHUNK + length]
        position += CHUNK + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def run_of(folder: Path) -> dict:
    """A run's id, group, job type, config (the last update of each key) and history rows."""
    found = records(next(folder.glob("*.wandb")))
    run = next(r.run for r in found if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for r in found if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    history = [{i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
               for r in found if r.WhichOneof("record_type") == "history"]
    return {"id": run.run_id, "group": run.run_group, "job_type": run.job_type, "config": config, "history": history}
