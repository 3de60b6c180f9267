"""Evaluate a saved causal LM (a recipe's ``packed/`` or ``merged/`` export, any ``save_pretrained`` folder).

    python -m dsf_lightning.evaluate runs/<run>/packed           # the run's own protocol, from its results.json
    python -m dsf_lightning.evaluate FOLDER --tasks wiki_cloze --tasks-path tasks/ --ppl wikipedia --ppl notes.txt

Perplexity (:mod:`dsf_lightning.perplexity`, the recipe's windows) on each ``--ppl`` text and zero-shot accuracy
(:mod:`dsf_lightning.zero_shot`) on each ``--tasks`` task go to ``<output dir>/results.json`` in the LLM recipe's
layout (``identity``, ``perplexity``, ``zero_shot``, ``protocol``) plus ``evaluated``: ``{folder, kind, stage,
run}``; ``dsf-compare`` shows it beside the recipe runs as method ``<method>@<kind>``. The output directory
defaults to ``evaluation-<folder name>`` beside FOLDER.

When ``FOLDER/../results.json`` is the recipe run that wrote the export, it gives every default: identity,
evaluation texts, sequence length, window cap, batch sizes, dtype and zero-shot tasks (flags override); the
scores are filed under ``post_finetune`` (an export holds the run's final model). A ``--packed-dtype float32``
export of a float32 run then repeats the run's numbers exactly; a 16-bit export differs by the rounding of its
weights. Otherwise the identity comes from the packed structure (the pruned layers' method and density) or is
``dense`` (and the stage ``dense``) for a model without pruned layers; ``--stage`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsf_lightning import __version__
from dsf_lightning.data.text import DATASETS, eval_sources, eval_windows, model_context, resolve_seq_len
from dsf_lightning.dtypes import DTYPES, dtype_named
from dsf_lightning.models.causal_lm import (
    PACKED_FILE,
    load_causal_lm,
    load_packed_causal_lm,
    model_short_name,
)
from dsf_lightning.perplexity import PROTOCOL, perplexity, windows_record
from dsf_lightning.persistence.files import write_json
from dsf_lightning.persistence.structure import pruned_modules, structure_spec
from dsf_lightning.runs.records import STAGES, run_identity, versions
from dsf_lightning.zero_shot import check_tasks, zero_shot, zero_shot_protocol

__all__ = ["evaluate_folder", "main", "run_record"]


def run_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The recipe's ``results.json`` beside ``folder`` (its parent's) when that run exported ``folder``, else None."""
    path = Path(folder).resolve().parent / "results.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    exports = record.get("exports") or {}
    mine = Path(folder).resolve()
    if "identity" not in record or not any(Path(p).resolve() == mine for k, p in exports.items()
                                           if k in ("packed", "merged")):
        return None
    return {**record, "path": str(path)}


def _identity(folder: Path, model: nn.Module, record: dict[str, Any] | None) -> dict[str, Any]:
    if record is not None:
        return record["identity"]
    spec, layers = structure_spec(model)["modules"], [m for _, m in pruned_modules(model)]
    if not layers:
        return run_identity(model_short_name(str(folder)), "dense", 1.0, None)
    methods = sorted({str(m["method"]) for m in spec})
    nnz, numel = sum(m.nnz for m in layers), sum(m.out_dim * m.fan_in for m in layers)
    return run_identity(model_short_name(str(folder)), "+".join(methods), round(nnz / numel, 4), None)


def _kind(folder: Path, record: dict[str, Any] | None) -> str:
    if (folder / PACKED_FILE).is_file():
        return "packed"
    merged = (record or {}).get("exports", {}).get("merged")
    return "merged" if merged and Path(merged).resolve() == folder.resolve() else "pretrained"


def _load(folder: Path, dtype: str) -> tuple[nn.Module, Any]:
    if (folder / PACKED_FILE).is_file():
        return load_packed_causal_lm(folder, dtype)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is neither a packed export (no {PACKED_FILE}) nor a save_pretrained "
                         f"folder (no config.json): pass a recipe run's packed/ or merged/ folder, or a model folder")
    model, tokenizer, _ = load_causal_lm(str(folder), dtype)
    return model, tokenizer


def _texts(ppl: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--ppl`` values split into dataset names and files; ``ValueError`` for one that is neither."""
    for p in ppl:
        if p not in DATASETS and not Path(p).is_file():
            raise ValueError(f"--ppl {p!r} is neither an evaluation dataset {DATASETS} nor a text file")
    return [p for p in ppl if p in DATASETS], [p for p in ppl if p not in DATASETS]


def evaluate_folder(folder: str | os.PathLike, *, tasks: Sequence[str] | None = None, tasks_path: str | None = None,
                    limit: int | None = None, fewshot: int | None = None, tasks_batch_size: int | None = None,
                    ppl: Sequence[str] | None = None, seq_len: int | None = None, eval_samples: int | None = None,
                    batch_size: int | None = None, dtype: str | None = None, stage: str | None = None,
                    device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The results (module docstring) of the model saved in ``folder``; ``None`` arguments take the exporting
    run's values (:func:`run_record`), else the recipe's defaults. ``ValueError`` naming the flag on bad input,
    before the model is loaded where the input allows it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder: pass a packed/, merged/ or save_pretrained folder")
    record = run_record(folder)
    cfg = (record or {}).get("config", {})
    data, zs = cfg.get("data", {}), cfg.get("zero_shot", {})
    tasks = list(tasks if tasks is not None else zs.get("tasks") or ())
    tasks_path = tasks_path if tasks_path is not None else zs.get("tasks_path") if tasks else None
    if tasks:
        check_tasks(tasks, tasks_path)
    if ppl is not None:
        sources = eval_sources(*_texts(ppl))
    elif record is not None or not tasks:  # the run's texts (its default: wikipedia), or wikipedia
        sources = eval_sources(data.get("eval"), data.get("eval_text") or ())
    else:
        sources = []
    dtype = dtype or cfg.get("model", {}).get("dtype", "float32")
    dtype_named(dtype, "--dtype")
    if stage is not None and stage not in STAGES:
        raise ValueError(f"--stage must be one of {STAGES}, got {stage!r}")
    model, tokenizer = _load(folder, dtype)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    who = _identity(folder, model, record)
    stage = stage or ("post_finetune" if record is not None or pruned_modules(model) else "dense")
    protocol: dict[str, Any] = {"model": {"folder": str(folder), "class": type(model).__name__, "dtype": dtype},
                                "versions": versions()}
    out: dict[str, Any] = {"identity": who, "version": __version__,
                           "evaluated": {"folder": str(folder), "kind": _kind(folder, record), "stage": stage,
                                         "run": (record or {}).get("path")}}
    if sources:
        context, where = model_context(model, tokenizer)
        seq_len = resolve_seq_len(seq_len if seq_len is not None else data.get("seq_len"), context, where)
        cap = eval_samples if eval_samples is not None else data.get("eval_samples")
        scores, windows = {}, {}
        for src in sources:
            w, text_tokens = eval_windows(tokenizer, src, seq_len, cap)
            windows[src.name] = windows_record(src.origin, text_tokens, w)
            scores[src.name] = perplexity(model, w, batch_size=batch_size or data.get("batch_size", 8), device=dev,
                                          distributed=False, progress=progress, desc=f"perplexity {src.name}"
                                          ).perplexity
        out["perplexity"] = {stage: scores}
        protocol.update(seq_len=seq_len, eval=windows, eval_protocol=PROTOCOL)
    if tasks:
        res = zero_shot(model, tokenizer, tasks, include_path=tasks_path,
                        limit=limit if limit is not None else zs.get("limit"),
                        num_fewshot=fewshot if fewshot is not None else zs.get("fewshot"),
                        batch_size=tasks_batch_size or zs.get("batch_size", 8))
        out["zero_shot"] = {stage: res["results"]}
        protocol["zero_shot"] = zero_shot_protocol(res)
    out["protocol"] = protocol
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsf_lightning.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a packed/ or merged/ export of the LLM recipe, or a save_pretrained folder")
    p.add_argument("--tasks", action="append", metavar="NAME", help="lm-eval task or preset (repeatable)")
    p.add_argument("--tasks-path", metavar="DIR", help="folder of your own task YAMLs (local data)")
    p.add_argument("--tasks-limit", type=int, metavar="N", help="at most N documents per task")
    p.add_argument("--tasks-fewshot", type=int, metavar="K", help="examples per prompt (default: the task's own)")
    p.add_argument("--tasks-batch-size", type=int, help="requests per forward")
    p.add_argument("--ppl", action="append", metavar="TEXT",
                   help=f"perplexity on a dataset {DATASETS} or a text file (repeatable); default: the run's texts, "
                        f"or wikipedia")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the run's, else the recipe's rule)")
    p.add_argument("--eval-samples", type=int, help="at most N windows per text")
    p.add_argument("--batch-size", type=int, help="windows per forward")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="weights' dtype (default: the run's, else float32)")
    p.add_argument("--stage", choices=STAGES, help="the stage the scores are filed under")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output-dir", help="where results.json goes (default: evaluation-<folder name> beside FOLDER)")
    p.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        result = evaluate_folder(args.folder, tasks=args.tasks, tasks_path=args.tasks_path, limit=args.tasks_limit,
                                 fewshot=args.tasks_fewshot, tasks_batch_size=args.tasks_batch_size, ppl=args.ppl,
                                 seq_len=args.seq_len, eval_samples=args.eval_samples, batch_size=args.batch_size,
                                 dtype=args.dtype, stage=args.stage, device=args.device, progress=args.progress_bar)
    except (ValueError, ImportError) as e:
        print(f"python -m dsf_lightning.evaluate: error: {e}", file=sys.stderr)
        return 2
    folder = Path(args.folder).resolve()
    out = Path(args.output_dir) if args.output_dir else folder.parent / f"evaluation-{folder.name}"
    write_json(out / "results.json", result)
    stage = result["evaluated"]["stage"]
    for name, v in result.get("perplexity", {}).get(stage, {}).items():
        print(f"perplexity {name}: {v:.6g}")
    for task, metrics in result.get("zero_shot", {}).get(stage, {}).items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples"))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
