"""Zero-shot accuracy of an in-memory causal LM with EleutherAI's lm-evaluation-harness (``lm-eval``), offline-aware.

>>> names = check_tasks(["wanda"])                                  # before any work: known, reachable
>>> zero_shot(model, tokenizer, ["wiki_next_sentence"], include_path="tasks/", limit=50)
{"results": {"wiki_next_sentence": {"acc": 0.41, "acc_stderr": 0.07, "acc_norm": ..., ...}},
 "versions": {"wiki_next_sentence": 1.0}, "n_shot": {...}, "lm_eval": "0.4.13", "limit": 50}

The model object and its tokenizer go to ``lm-eval``'s ``HFLM`` as they are: nothing is saved and reloaded,
so the pruned (or fine-tuned) model in memory is what is scored. Task names are lm-eval's; ``wanda`` is the
preset of the seven tasks Wanda reports (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA).
``include_path``: a folder of the user's own task YAMLs (lm-eval's ``TaskManager(include_path=...)``), for
example over local JSONL files (:func:`~dsf_lightning.data.tasks.write_local_tasks`). Tasks lm-eval ships
read their datasets from the Hugging Face hub; with the hub offline (``HF_HUB_OFFLINE`` or
``HF_DATASETS_OFFLINE``) :func:`check_tasks` refuses them, naming the task and how to give local data.
Standard errors of means are lm-eval's analytic ones; of other aggregations (perplexity), a 1,000-sample
bootstrap. Under ``torch.distributed`` each process that calls :func:`zero_shot` scores every document
itself (the recipe: every rank, the same numbers; no rank waits on another through a collective); a model
sharded with FSDP is scored the same way, every rank running the same forwards in lock step.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsf_lightning.data.offline import hub_offline

__all__ = ["PRESETS", "check_tasks", "expand_tasks", "zero_shot", "zero_shot_protocol"]

#: named task lists: ``wanda`` = the seven zero-shot tasks of Wanda (Sun et al., 2024)
PRESETS: dict[str, tuple[str, ...]] = {
    "wanda": ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")}
#: bootstrap samples for the standard errors lm-eval cannot give analytically (its default is 100,000)
BOOTSTRAP_ITERS = 1000


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError("zero-shot evaluation needs lm-eval: pip install 'dsf-lightning[eval]'") from e
    return lm_eval


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """``tasks`` with every preset name replaced by its tasks, duplicates dropped, order kept."""
    out: list[str] = []
    for t in tasks:
        for name in PRESETS.get(t, (t,)):
            if name not in out:
                out.append(name)
    return out


def _task_manager(include_path: str | os.PathLike | None) -> Any:
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"the task folder {str(include_path)!r} (--eval-tasks-path) is not a directory")
    return _indexed(str(Path(include_path).resolve()) if include_path is not None else None)


@functools.lru_cache(maxsize=8)
def _indexed(include_path: str | None) -> Any:
    """lm-eval's task index with ``include_path`` (indexing its ~15,000 task files takes seconds: once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _is_local(entry: Any, include_path: str | os.PathLike | None) -> bool:
    """Whether a task comes from the user's folder (its YAML is under ``include_path``)."""
    path = getattr(entry, "yaml_path", None)
    if include_path is None or path is None:
        return False
    return Path(path).resolve().is_relative_to(Path(include_path).resolve())


def check_tasks(tasks: Sequence[str], include_path: str | os.PathLike | None = None) -> list[str]:
    """The lm-eval task names ``tasks`` stand for (presets expanded), after checking each is known and, with the
    hub offline, defined in ``include_path``; ``ValueError`` naming the task otherwise, before any work."""
    _lm_eval()
    names = expand_tasks(tasks)
    if not names:
        raise ValueError("no zero-shot task given")
    manager = _task_manager(include_path)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise ValueError(f"zero-shot task {name!r} is not an lm-eval task"
                             f"{f' (close: {close})' if close else ''}; a task of your own needs its YAML in a "
                             f"folder given as --eval-tasks-path DIR")
        entry = manager.task_index[name]
        if hub_offline(datasets=True) and not _is_local(entry, include_path):
            source = (getattr(entry, "cfg", None) or {}).get("dataset_path", "its dataset")
            raise ValueError(f"zero-shot task {name!r} reads {source!r} from the Hugging Face hub, which is offline "
                             f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): write a task YAML over local data "
                             f"(dataset_path: json, dataset_kwargs: {{data_files: ...}}) in a folder and give it "
                             f"as --eval-tasks-path DIR (include_path=DIR)")
    return names


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` as ``{"acc": x, "acc_stderr": s}``."""
    out = {}
    for key, value in row.items():
        metric, _, _ = key.partition(",")
        if metric == "sample_len":
            out["samples"] = int(value)  # documents scored
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric] = float(value)
    return out


def zero_shot(model: nn.Module, tokenizer: Any, tasks: Sequence[str], *,
              include_path: str | os.PathLike | None = None, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Score ``model`` (a Hugging Face causal LM, in memory) on lm-eval ``tasks`` (module docstring).

    Args:
        tasks: lm-eval task names or presets (:data:`PRESETS`).
        include_path: a folder of task YAMLs of your own (searched besides lm-eval's).
        limit: at most this many documents per task (all by default).
        num_fewshot: examples in each prompt (the task's default, usually 0).
        batch_size: requests per forward.

    Returns:
        ``{"results": {task: {metric: value, "<metric>_stderr": ..., "samples": n}}, "versions": {task: version},
        "n_shot": {task: k}, "lm_eval": version, "limit": limit}``. The model's training flag is restored.
    """
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    names = check_tasks(tasks, include_path)
    device = next(model.parameters()).device
    training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    # lm-eval returns results only where LOCAL_RANK is 0 (one process writing files); an evaluation here is
    # complete in each process that runs it, so each process is its own rank 0 for the call
    local_rank = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        with torch.no_grad():
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=_task_manager(include_path), log_samples=False,
                                          bootstrap_iters=BOOTSTRAP_ITERS)
    finally:
        model.train(training)
        if local_rank is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = local_rank
    return {"results": {t: _metrics(out["results"][t]) for t in names},
            "versions": {t: out["versions"].get(t) for t in names},
            "n_shot": {t: out["n-shot"].get(t) for t in names},
            "lm_eval": lm_eval.__version__, "limit": limit}


def zero_shot_protocol(result: dict[str, Any]) -> dict[str, Any]:
    """What a :func:`zero_shot` result was measured with (the protocol record of ``results.json``): the tasks,
    lm-eval's version, the task versions, the shots and the document limit."""
    return {"tasks": list(result["results"]), **{k: result[k] for k in ("lm_eval", "versions", "n_shot", "limit")}}
