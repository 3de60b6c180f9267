"""Read an offline W&B run back from its ``.wandb`` file, for tests that check what was logged.

Offline runs write no ``wandb-summary.json`` and wandb has no public reader for the file, so this
parses its LevelDB-log framing (7-byte header, 32 KiB blocks, records ``crc32 u32, len u16, type
u8``) of protobuf ``Record`` s.
"""

from __future__ import annotations

import glob
import json
import os
import struct


def wandb_records(save_dir) -> dict[str, dict]:
    """``{"history": {key: last value}, "config": {key: value}, "run": {...}}`` of the one offline run
    under ``save_dir``, read from its ``.wandb`` file."""
    import time

    (path,) = glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*", "run-*.wandb"))
    deadline = time.monotonic() + 30
    while True:  # wandb-core may still be writing after wandb.finish(): wait for the exit record
        out = _read_wandb_file(path)
        if out["exited"] or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read_wandb_file(path: str) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    out: dict = {"history": {}, "config": {}, "run": {}, "exited": False}
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and typ == 0:
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = payload if typ in (1, 2) else buf + payload
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                for it in rec.history.item:
                    out["history"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
            elif kind == "config":
                for it in rec.config.update:
                    out["config"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
            elif kind == "exit":
                out["exited"] = True
            elif kind == "run":
                r = rec.run
                out["run"] = {"name": r.display_name, "group": r.run_group, "project": r.project,
                              "tags": list(r.tags), "job_type": r.job_type}
                for it in r.config.update:
                    out["config"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
            buf = b""
    return out
