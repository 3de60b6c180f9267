"""Read the one offline W&B run under a folder back (``dsf_lightning.runs.records.read_wandb_file``), for tests."""

from __future__ import annotations

import glob
import os

from dsf_lightning.runs.records import read_wandb_file


def wandb_records(save_dir) -> dict[str, dict]:
    """``{"history", "summary", "config", "run", "exited"}`` of the one offline run under ``save_dir``."""
    import time

    (path,) = glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*", "run-*.wandb"))
    deadline = time.monotonic() + 30
    while True:  # wandb-core may still be writing after wandb.finish(): wait for the exit record
        out = read_wandb_file(path)
        if out["exited"] or time.monotonic() > deadline:
            return out
        time.sleep(0.5)
