"""Reading finished runs back from disk: recipe ``results.json`` files, Lightning CSV logs, offline W&B runs.

Every source becomes a :class:`RunRecord`: who the run was (model, method, density, allocation, seed) and
its metrics by stage (``dense``, ``pre_finetune``, ``bn_recalibrated``, ``post_finetune``), e.g.
``{"post_finetune": {"val_acc": 0.93}}``; language-model perplexities are ``{"ppl/<eval text>": ...}``.

* ``results.json`` of the recipes: the ``identity`` header (:func:`run_identity`, written by every recipe)
  names the run;
  vision recipes keep their metrics as ``{"metrics": {"<stage>/<name>": value}}``, the LLM recipe as
  ``{"perplexity": {"<stage>": {"<eval text>": value}}}`` and, with zero-shot tasks, ``{"zero_shot":
  {"<stage>": {"<task>": {"acc": ...}}}}`` (as ``zs/<task>/<metric>`` and ``zs/mean/acc``); a ``results.json``
  of ``python -m dsf_lightning.evaluate`` (``evaluated: {kind, ...}``) is the method ``<method>@<kind>``.
* Lightning CSV logs (``metrics.csv`` beside ``hparams.yaml``) of any ``Trainer`` with
  ``DSFPruneCallback``: the callback logs its config and the module's class as the ``dsf``
  hyperparameters.
* Offline W&B runs (``wandb/offline-run-*/run-*.wandb``) of the recipes (their config holds the
  ``identity``): read from the file's record log, as wandb has no public reader for offline runs; a
  run that also has a ``results.json`` is taken from there.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import platform
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STAGES", "RunRecord", "find_runs", "method_label", "read_results_json", "read_wandb_file", "run_identity",
           "run_name", "versions"]

#: The stages a pruned run is evaluated at, in order.
STAGES = ("dense", "pre_finetune", "bn_recalibrated", "post_finetune")


def run_identity(model: str, method: str, density: float, seed: int | None, allocation: str = "uniform",
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Who a run is: the ``identity`` header of ``results.json`` and of the W&B config. ``options`` are
    the method options the user set (they make a different method variant, e.g. DSF without finalization)."""
    return {"model": model, "method": method, "density": float(density), "seed": seed, "allocation": allocation,
            "options": dict(options or {})}


def versions() -> dict[str, str | None]:
    """Python's and the libraries' versions (``None``: not installed): the ``versions`` of a protocol record."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("dsf-lightning", "torch", "transformers", "tokenizers", "lightning", "torchmetrics", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def method_label(method: str, options: dict[str, Any] | None = None) -> str:
    """``method`` with the options that make it a variant, e.g. ``dsf+finalize=second`` or ``dsf+finalize=``
    (no finalization): runs of different variants are never grouped together."""
    def value(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return method + "".join(f"+{k}={value(v)}" for k, v in sorted((options or {}).items()))


def run_name(identity: dict[str, Any]) -> str:
    """``<model>-<method>-d<density>-s<seed>``, e.g. ``resnet20-32-dsf-d0.1-s0``, with ``-<allocation>`` appended
    for a non-uniform one. Method options are not in the name (it would grow with every option): variants
    differ by ``identity["options"]``, their W&B tag and their output folder."""
    name = f"{identity['model']}-{identity['method']}-d{identity['density']:g}-s{identity['seed']}"
    return name if identity.get("allocation", "uniform") == "uniform" else f"{name}-{identity['allocation']}"


@dataclass
class RunRecord:
    """One finished run: identity (``method`` is its :func:`method_label`) and ``{stage: {metric: value}}``."""

    model: str
    method: str
    density: float
    seed: int | None
    allocation: str = "uniform"
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = ""

    @property
    def key(self) -> tuple[str, str, float, str]:
        """What runs are grouped by: everything but the seed."""
        return self.model, self.method, self.density, self.allocation


def _stage_metrics(flat: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"pre_finetune/val_acc": 0.9, ...}`` -> ``{"pre_finetune": {"val_acc": 0.9}}`` (known stages only)."""
    out: dict[str, dict[str, float]] = {}
    for k, v in flat.items():
        stage, _, name = str(k).partition("/")
        if stage in STAGES and name and isinstance(v, (int, float)) and not isinstance(v, bool):
            out.setdefault(stage, {})[name] = float(v)
    return out


def read_results_json(path: Path) -> RunRecord:
    """A recipe's ``results.json`` (see the module docstring); ``ValueError`` if it names no run."""
    data = json.loads(Path(path).read_text())
    identity = data.get("identity")
    if not isinstance(identity, dict):
        raise ValueError(f"{path}: no 'identity' header (model, method, density, seed): not written by a recipe")
    metrics = _stage_metrics(data.get("metrics") or {})
    for stage, values in (data.get("perplexity") or {}).items():
        if stage in STAGES and isinstance(values, dict):
            metrics.setdefault(stage, {}).update({f"ppl/{n}": float(v) for n, v in values.items()})
    for stage, tasks in (data.get("zero_shot") or {}).items():
        if stage in STAGES and isinstance(tasks, dict):
            metrics.setdefault(stage, {}).update(zero_shot_metrics(tasks))
    record = _record(identity, metrics, path)
    evaluated = data.get("evaluated")
    if isinstance(evaluated, dict):  # python -m dsf_lightning.evaluate on an export: a row of its own
        record.method += f"@{evaluated.get('kind', 'saved')}"
    return record


def zero_shot_metrics(tasks: dict[str, dict[str, float]]) -> dict[str, float]:
    """``zs/<task>/<metric>`` of one stage's zero-shot scores (``acc``, ``acc_norm``, ``perplexity``; not the
    standard errors), and ``zs/mean/acc``: the mean accuracy over the tasks that have one."""
    out = {f"zs/{t}/{m}": float(v) for t, ms in tasks.items() for m, v in ms.items()
           if m in ("acc", "acc_norm", "perplexity")}
    accs = [ms["acc"] for ms in tasks.values() if "acc" in ms]
    if accs:
        out["zs/mean/acc"] = sum(accs) / len(accs)
    return out


def _record(identity: dict[str, Any], metrics: dict[str, dict[str, float]], source: Path) -> RunRecord:
    options = identity.get("options", identity.get("factorization_options"))
    return RunRecord(model=str(identity["model"]), method=method_label(str(identity["method"]), options),
                     density=float(identity["density"]), seed=identity.get("seed"),
                     allocation=str(identity.get("allocation", "uniform")), metrics=metrics, source=str(source))


def _hparams_loader() -> type:
    """A safe YAML loader that also reads the ``!!python/tuple`` Lightning writes for tuple hyperparameters."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
    return Loader


def _read_csv_log(path: Path) -> RunRecord | None:
    """A Lightning ``metrics.csv`` whose ``hparams.yaml`` holds the callback's ``dsf`` config, else ``None``."""
    import yaml

    hparams_file = path.parent / "hparams.yaml"
    hparams = yaml.load(hparams_file.read_text(), Loader=_hparams_loader()) if hparams_file.exists() else None
    dsf = (hparams or {}).get("dsf")
    if not isinstance(dsf, dict):
        return None
    last: dict[str, float] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            last.update({k: float(v) for k, v in row.items() if v not in ("", None) and k})
    return _record(dsf, _stage_metrics(last), path)


def read_wandb_file(path: Path) -> dict[str, Any]:
    """``{"history": {key: last value}, "summary": {...}, "config": {...}, "run": {name, group, project, tags},
    "exited"}``
    of an offline ``.wandb`` file: its LevelDB-log framing (7-byte header, 32 KiB blocks, records
    ``crc32 u32, len u16, type u8``) of wandb's protobuf ``Record`` s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    out: dict[str, Any] = {"history": {}, "summary": {}, "config": {}, "run": {}, "exited": False}
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
        if typ in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            kind = rec.WhichOneof("record_type")
            items = (rec.history.item if kind == "history" else rec.config.update if kind == "config"
                     else rec.run.config.update if kind == "run" else rec.summary.update if kind == "summary" else ())
            target = out[kind] if kind in ("history", "summary") else out["config"]
            for it in items:
                target[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
            if kind == "exit":
                out["exited"] = True
            elif kind == "run":
                r = rec.run
                out["run"] = {"name": r.display_name, "group": r.run_group, "project": r.project,
                              "tags": list(r.tags), "job_type": r.job_type}
            buf = b""
    return out


def _read_wandb_run(path: Path) -> RunRecord | None:
    rec = read_wandb_file(path)
    identity = rec["config"].get("identity")
    if not isinstance(identity, dict) or "model" not in identity:
        return None  # not a recipe's prune run (e.g. a dense training run)
    return _record(identity, _stage_metrics({**rec["history"], **rec["summary"]}), path)


def find_runs(paths: list[str | Path]) -> list[RunRecord]:
    """Every run record under ``paths`` (files or folders, searched recursively). A run with a
    ``results.json`` is read from it, and its W&B copy (same identity and seed) is skipped. ``ValueError``
    naming the paths when none holds a run."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        files += [p] if p.is_file() else sorted(p.rglob("*"))
    records = [read_results_json(f) for f in files if f.name == "results.json"]
    have = {(r.key, r.seed) for r in records}
    for f in files:
        if f.name == "metrics.csv" and (r := _read_csv_log(f)) is not None:
            records.append(r)
        elif f.suffix == ".wandb" and f.name.startswith("run-") and (r := _read_wandb_run(f)) is not None:
            if (r.key, r.seed) not in have:
                records.append(r)
    if not records:
        raise ValueError(f"no runs under {[str(p) for p in paths]}: expected recipe results.json files, Lightning "
                         f"CSV logs of a Trainer with DSFPruneCallback, or offline W&B runs (wandb/offline-run-*)")
    return records
