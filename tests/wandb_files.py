"""What W&B wrote offline under RUN_DIR/wandb: each attempt's run-ID.wandb transaction log, read as wandb-core writes
it (LevelDB's log format: 32 KiB blocks of CRC-checked chunks, after a 7-byte ":W&B" header) into wandb's own
protobuf Records. wandb 0.31 has no Python reader of these files (wandb.sdk.internal.datastore went with the Python
backend); its own reader, `wandb leet inspect --json FILE`, is a wandb-core process that takes 0.8 s a file here."""
from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER, CHUNK, BLOCK = struct.Struct("<4sHB"), struct.Struct("<IHB"), 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert HEADER.unpack_from(data) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    out, pos, parts = [], HEADER.size, []
    while pos + CHUNK.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        chunk = data[pos + CHUNK.size:pos + CHUNK.size + length]
        if kind == 0 or len(chunk) < length:  # zeros or a torn tail: the end of what was written
            break
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: checksum mismatch at byte {pos}"
        pos += CHUNK.size + length
        parts = [chunk] if kind in (FULL, FIRST) else parts + [chunk]
        if kind in (FULL, LAST):
            out.append(pb.Record.FromString(b"".join(parts)))
    return out


def _items(items) -> dict:
    """A record's items as {key: value}: a top-level key is in nested_key (one part) or key, a value in value_json
    (wandb-core's) or a typed field."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) if item.value_json else
            getattr(item, item.WhichOneof("value") or "none", None) for item in items}


def attempt(path: Path) -> dict:
    """One offline wandb.init's run-ID.wandb: {"id", "project", "group", "name", "config", "history", "summary",
    "preempting", "exit_code"}; history: the logged rows (with W&B's _step, _runtime...)."""
    got = {"id": None, "start": 0, "config": {}, "history": [], "summary": {}, "preempting": False,
           "exit_code": None}  # the id stays None where not even the run record was written
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            got.update(id=r.run.run_id, start=r.run.start_time.ToNanoseconds(), project=r.run.project,
                       group=r.run.run_group, name=r.run.display_name)
            got["config"].update(_items(r.run.config.update))
        elif kind == "config":
            got["config"].update(_items(r.config.update))
        elif kind == "history":
            got["history"].append(_items(r.history.item))
        elif kind == "summary":
            got["summary"].update(_items(r.summary.update))
        elif kind == "preempting":
            got["preempting"] = True
        elif kind == "exit":
            got["exit_code"] = r.exit.exit_code
    return got


def attempts(run_dir: Path, wait_s: float = 5.0) -> list[dict]:
    """Each offline wandb.init under run_dir, in the order they started. wandb-core writes the last records a moment
    after run.finish() returns (measured: 1 finish in 20 not yet on disk, all within 6 ms): up to wait_s for every
    attempt's exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [attempt(path) for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")]
        if all(a["exit_code"] is not None for a in found) or time.monotonic() > deadline:
            return sorted(found, key=lambda a: a["start"])
        time.sleep(0.01)


def history(run_dir: Path) -> dict[str, list[dict]]:
    """Run id -> its history rows across all the offline attempts, in order."""
    rows: dict[str, list[dict]] = {}
    for attempt in attempts(run_dir):
        rows.setdefault(attempt["id"], []).extend(attempt["history"])
    return rows
