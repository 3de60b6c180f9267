"""The LLM recipe's run: check everything first, then start the ranks, evaluate, prune, fine-tune, export, record.

:func:`prepare_llama` loads the model, resolves the sequence length, checks the prune against the model and
cuts every token window (so a bad model id, a too long ``--seq-len``, too little text or an empty file stop
the run before anything is computed). The run is one SPMD program: with more than one device :func:`launch`
starts the other ranks first (Lightning's own launcher, through Fabric: the script is started again for
every other local rank, or ``torchrun``/SLURM already started them) and joins the process group, and every
rank then runs :func:`execute_llama`:

1. dense perplexity on every evaluation text (each rank scores its share of the windows; sums
   all-reduced);
2. ``prune(model, config.prune, calibration=<this rank's windows>)``: sequential, so one decoder block's
   Grams at a time (all-reduced), its layers split across the ranks, the factors broadcast, so every rank
   holds the same pruned model;
3. ``pre_finetune`` perplexity; fine-tuning with ``Trainer(strategy="ddp")`` (the process group already
   exists, so Lightning launches nothing) + :class:`~dsf_lightning.models.CausalLM`; ``post_finetune``;
4. rank zero: ``packed/`` and ``merged/`` exports, ``results.json``, the summary.

With ``--eval-tasks``, zero-shot accuracy (:mod:`dsf_lightning.zero_shot`, lm-eval) follows each perplexity
evaluation: every rank scores every document (the same numbers, no rank waiting on another).

``--strategy fsdp``: steps 1-2 as above (the prune runs on whole modules, before any wrapping), then the
fine-tuning ``Trainer`` takes Lightning's ``ModelParallelStrategy`` and ``CausalLM`` shards the pruned model
by decoder block (FSDP2; :mod:`~dsf_lightning.models.sharding`); ``post_finetune`` scores the sharded model
(every rank runs the same number of forwards; zero-shot: every rank runs every document, the sharded
forwards in lock step); the model is then gathered whole on rank 0's CPU for the mask count and the exports.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from dsf_lightning import __version__
from dsf_lightning.callbacks import FiniteLossGuard, TrainingMemory
from dsf_lightning.callbacks.memory import model_storage
from dsf_lightning.callbacks.prune_logging import log_report
from dsf_lightning.data.text import (
    TextDataModule,
    TextSource,
    calibration_source,
    calibration_windows,
    consecutive_windows,
    eval_sources,
    eval_windows,
    model_context,
    resolve_seq_len,
)
from dsf_lightning.distill import Distiller, distiller_for
from dsf_lightning.dtypes import DTYPES
from dsf_lightning.models.causal_lm import (
    PACKED_FILE,
    CausalLM,
    load_causal_lm,
    model_short_name,
    set_activation_checkpointing,
)
from dsf_lightning.models.sharding import gathered, is_fully_sharded
from dsf_lightning.perplexity import PROTOCOL, perplexity, windows_record
from dsf_lightning.persistence.export import save_packed
from dsf_lightning.persistence.files import atomic_folder, write_json
from dsf_lightning.persistence.structure import nonzeros_outside_masks, to_dense
from dsf_lightning.pipeline.blocks import decoder_blocks
from dsf_lightning.pipeline.distributed import world
from dsf_lightning.pipeline.entry import prune
from dsf_lightning.pipeline.plan import plan_prune
from dsf_lightning.pipeline.report import PruneReport
from dsf_lightning.recipes.common import (
    finish_wandb,
    identity,
    make_wandb_logger,
    memory_figures,
    recipe_main,
    wandb_summary,
    with_output_dir,
    write_config,
)
from dsf_lightning.recipes.llm.config import (
    DISTILL_KINDS,
    FSDP_ONE_PROCESS,
    STRATEGIES,
    LlamaRecipeConfig,
    llama_parser,
)
from dsf_lightning.recipes.sections import RunConfig, check_distill
from dsf_lightning.runs.records import run_name, versions
from dsf_lightning.zero_shot import check_tasks, zero_shot, zero_shot_protocol

__all__ = ["LlamaPrepared", "execute_llama", "export_pruned", "launch", "llama_main", "prepare_llama",
           "protocol_record", "run_llama"]

STAGES = ("dense", "pre_finetune", "post_finetune")


@dataclass
class LlamaPrepared:
    """A checked LLM run, ready to go: its config (``seq_len`` and output directory resolved), the model and
    tokenizer, names for W&B, the token windows and the protocol record."""

    config: LlamaRecipeConfig
    model: nn.Module
    tokenizer: Any
    model_name: str
    calibration_name: str
    calibration: Tensor  # (calibration_samples, seq_len)
    train: Tensor | None  # (n, seq_len) fine-tuning windows
    evals: dict[str, Tensor]  # name -> (k, seq_len)
    protocol: dict[str, Any]


def protocol_record(config: LlamaRecipeConfig, *, name: str, model: nn.Module, source: str,
                    context: tuple[int | None, str], calibration_source: TextSource, calibration: Tensor,
                    stream: Tensor,
                    eval_sources: list[TextSource], evals: dict[str, Tensor], eval_tokens: dict[str, int],
                    train: Tensor | None) -> dict[str, Any]:
    """What every result was measured on: model, calibration text and tokens, sequence length, each
    evaluation text and its tokens, fine-tuning text, method, library versions."""
    seq_len, p = config.data.seq_len, config.prune
    origins = {s.name: s.origin for s in eval_sources}
    return {
        "model": {"name": name, "source": source, "class": type(model).__name__, "dtype": config.model.dtype,
                  "parameters": sum(t.numel() for t in model.parameters()),
                  "decoder_blocks": len(decoder_blocks(model)),
                  "context": context[0], "context_source": context[1]},
        "seq_len": seq_len,
        "calibration": {"text": calibration_source.name, "origin": calibration_source.origin,
                        "samples": calibration.shape[0], "tokens": calibration.numel(), "text_tokens": stream.numel(),
                        "sampling": "disjoint windows at random slots of the tokenized text", "seed": p.seed},
        "eval": {n: windows_record(origins[n], eval_tokens[n], w) for n, w in evals.items()},
        "eval_protocol": PROTOCOL,
        "finetune": None if train is None else {"text": calibration_source.name, "windows": train.shape[0],
                                                "tokens": train.numel(), "steps": config.finetune.steps},
        "prune": {"method": p.method, "density": p.density, "sequential": p.sequential,
                  "targets": "every Linear of the decoder blocks" if p.include is None else list(p.include)},
        "versions": versions(),
    }


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak memory so far: resident set (``ru_maxrss``; includes loading and the dense
    evaluation) and, on CUDA, the peak allocated since the last reset (the prune alone)."""
    out = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
    if device.type == "cuda":
        out["cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _strategy(run: RunConfig) -> str:
    """The name of the run's strategy: ``run.strategy``, or ``"ddp"`` with more than one device or node."""
    multi = (isinstance(run.devices, int) and run.devices > 1) or run.num_nodes > 1
    return run.strategy or ("ddp" if multi else "auto")


def _trainer_strategy(run: RunConfig) -> Strategy | str:
    """The fine-tuning ``Trainer``'s strategy: ``fsdp`` is Lightning's ``ModelParallelStrategy`` with every
    process in one data-parallel (sharding) group (``CausalLM.configure_model`` shards by decoder block)."""
    if _strategy(run) == "fsdp":
        return ModelParallelStrategy(data_parallel_size=world()[1], tensor_parallel_size=1)
    return _strategy(run)


def _precision(run: RunConfig) -> str:
    if run.precision:
        return run.precision
    if torch.cuda.is_available() and run.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def launch(run: RunConfig) -> torch.device:
    """Start the ranks of a multi-process run and join the process group (nothing for one process);
    returns this rank's device."""
    from lightning.fabric import Fabric

    # fsdp: the same processes and group as ddp (the Trainer shards later); Fabric's "fsdp" refuses a CPU
    fabric = Fabric(accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes,
                    strategy="ddp" if _strategy(run) == "fsdp" else _strategy(run), precision="32-true")
    if fabric.world_size > 1 and not torch.distributed.is_initialized():
        fabric.launch()
        rank_zero_only.rank = fabric.global_rank
    return fabric.device


def _evaluate(prepared: LlamaPrepared, model: nn.Module, device: torch.device, progress: bool) -> dict[str, float]:
    return {n: perplexity(model, w, batch_size=prepared.config.data.batch_size, device=device, progress=progress,
                          desc=f"perplexity {n}").perplexity for n, w in prepared.evals.items()}


def _zero_shot(prepared: LlamaPrepared, model: nn.Module, scores: dict[str, Any], stage: str) -> None:
    """Zero-shot accuracy of ``model`` at ``stage`` into ``scores`` (nothing without ``--eval-tasks``). Every
    rank scores every document (the same numbers, no collective to time out while one rank evaluates)."""
    zs = prepared.config.zero_shot
    if zs.tasks:
        scores[stage] = zero_shot(model, prepared.tokenizer, zs.tasks, include_path=zs.tasks_path, limit=zs.limit,
                                  num_fewshot=zs.fewshot, batch_size=zs.batch_size)


def _log(logger: Any, metrics: dict[str, float], step: int) -> None:
    if logger is not None:
        logger.log_metrics(metrics, step=step)


def _log_report(logger: Any, report: PruneReport) -> None:
    log_report([logger] if logger is not None else [], report, step=0)


def _prune(prepared: LlamaPrepared, model: nn.Module, device: torch.device, progress: bool) -> PruneReport:
    config = prepared.config
    rank, size = world()
    batches = list(prepared.calibration[rank::size].split(config.data.batch_size))

    def forward(m: nn.Module, ids: Tensor) -> Any:
        return m(input_ids=ids.to(device), use_cache=False)

    return prune(model, config.prune, calibration=batches if config.prune.calibrated else None, forward=forward,
                 progress=progress)


def _finetune(prepared: LlamaPrepared, model: nn.Module, logger: Any, progress: bool,
              distiller: Distiller | None) -> tuple[int, dict[str, Any]]:
    """Fine-tune ``model`` in place (``Trainer`` + ``CausalLM``, distilling from ``distiller``'s dense teacher
    if given); returns the optimizer steps taken and the fine-tune's memory figures
    (:class:`~dsf_lightning.callbacks.TrainingMemory`)."""
    config = prepared.config
    ft, run = config.finetune, config.run
    module = CausalLM(model, lr=ft.lr, weight_decay=ft.weight_decay, warmup_steps=ft.warmup,
                      lr_schedule=ft.lr_schedule, min_lr_ratio=ft.min_lr_ratio,
                      gradient_checkpointing=config.model.gradient_checkpointing, storage=config.prune.storage,
                      distiller=distiller)
    val = next(iter(prepared.evals.values())) if ft.val_every else None
    dm = TextDataModule(prepared.train, val, batch_size=ft.batch_size, num_workers=run.num_workers)
    trainer = pl.Trainer(
        accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes, strategy=_trainer_strategy(run),
        precision=_precision(run), max_steps=ft.steps, max_epochs=-1,
        accumulate_grad_batches=ft.accumulate_grad_batches,
        gradient_clip_val=ft.gradient_clip_val, logger=logger if logger is not None else False,
        callbacks=[FiniteLossGuard(), TrainingMemory(),
                   *([LearningRateMonitor(logging_interval="step")] if logger is not None else [])],
        enable_checkpointing=False, num_sanity_val_steps=0, val_check_interval=ft.val_every,
        check_val_every_n_epoch=None if ft.val_every else 1, limit_val_batches=None if ft.val_every else 0,
        log_every_n_steps=max(1, min(10, ft.steps)), enable_progress_bar=progress, enable_model_summary=False,
        default_root_dir=config.logging.output_dir)
    pl.seed_everything(run.seed, workers=True, verbose=False)  # the order of the fine-tuning windows
    trainer.fit(module, datamodule=dm)
    if config.model.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    return trainer.global_step, memory_figures(trainer)


def export_pruned(model: nn.Module, tokenizer: Any, output_dir: str, packed: bool = True, merged: bool = True,
                  packed_dtype: str = "float16") -> dict[str, Any]:
    """``output_dir/packed/`` (``save_packed`` in ``packed_dtype`` + config + tokenizer) and ``output_dir/merged/``
    (``merge`` in place, then ``save_pretrained`` + tokenizer); returns the folders and the packed file's size.
    Each folder is written whole or not at all (:func:`~dsf_lightning.persistence.files.atomic_folder`): an
    export that fails or is killed midway leaves the previous export in that folder complete."""
    out: dict[str, Any] = {}
    if packed:
        folder = os.path.join(output_dir, "packed")
        with atomic_folder(folder) as tmp:
            out["packed_bytes"] = save_packed(model, tmp / PACKED_FILE, DTYPES[packed_dtype])
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        out["packed"] = folder
    if merged:
        folder = os.path.join(output_dir, "merged")
        to_dense(model)
        with atomic_folder(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        out["merged"] = folder
    return out


def summary(name: str, ppl: dict[str, dict[str, float]], seconds: dict[str, float], seq_len: int) -> str:
    """The perplexity table printed at the end of a run."""
    lines = [f"{name}: perplexity (windows of {seq_len} tokens)",
             f"  {'eval text':<20}{'dense':>12}{'pruned':>12}{'fine-tuned':>12}"]
    for n in ppl["pre_finetune"]:
        lines.append(f"  {n:<20}" + "".join(f"{ppl[s][n]:>12.6g}" if s in ppl else f"{'-':>12}" for s in STAGES))
    lines.append("  " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return "\n".join(lines)


def execute_llama(prepared: LlamaPrepared) -> dict[str, Any]:
    """Run a prepared LLM recipe on every rank (module docstring); returns the results (``results.json``)."""
    config = prepared.config
    run, ft = config.run, config.finetune
    device = launch(run)
    rank, size = world()
    if size > prepared.calibration.shape[0]:  # --devices auto: the count is only known now
        raise ValueError(f"--calibration-samples {prepared.calibration.shape[0]} is fewer than the {size} processes")
    if size == 1 and _strategy(run) == "fsdp":
        raise ValueError(FSDP_ONE_PROCESS)
    progress = run.progress_bar and rank == 0
    out = config.logging.output_dir
    write_config(config, out)
    who = identity(config, prepared.model_name)
    logger = make_wandb_logger(config, task="llm", group=f"{prepared.model_name}-{prepared.calibration_name}",
                               job_type="prune-finetune", run=who)
    if logger is not None:
        logger.log_hyperparams({"protocol": prepared.protocol})
    model = prepared.model.to(device)
    ppl: dict[str, dict[str, float]] = {}
    try:
        zs: dict[str, Any] = {}
        if config.data.eval_dense:
            ppl["dense"] = _evaluate(prepared, model, device, progress)
            _log(logger, {f"dense/ppl/{n}": v for n, v in ppl["dense"].items()}, 0)
            _zero_shot(prepared, model, zs, "dense")
        distiller = distiller_for(model, config.distill)  # the teacher: the dense model, copied before the prune
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report = _prune(prepared, model, device, progress)
        seconds = {"prune_seconds": time.perf_counter() - start}
        memory = peak_memory(device)
        _log_report(logger, report)
        ppl["pre_finetune"] = _evaluate(prepared, model, device, progress)
        _log(logger, {f"pre_finetune/ppl/{n}": v for n, v in ppl["pre_finetune"].items()}, 0)
        _zero_shot(prepared, model, zs, "pre_finetune")
        steps, finetune_memory = 0, {"storage": model_storage(model)}
        if ft.steps > 0:
            start = time.perf_counter()
            steps, finetune_memory = _finetune(prepared, model, logger, progress, distiller)
            seconds["finetune_seconds"] = time.perf_counter() - start
            ppl["post_finetune"] = _evaluate(prepared, model, device, progress)
            _zero_shot(prepared, model, zs, "post_finetune")
        else:  # no fine-tuning: the model after zero steps is the pruned one
            ppl["post_finetune"] = dict(ppl["pre_finetune"])
            if "pre_finetune" in zs:
                zs["post_finetune"] = zs["pre_finetune"]
        _log(logger, {f"post_finetune/ppl/{n}": v for n, v in ppl["post_finetune"].items()}, steps)
        # fsdp: the whole model on rank 0 (a collective) for the mask count and the exports; None elsewhere
        whole = gathered(model) if is_fully_sharded(model) else model
        count = [nonzeros_outside_masks(whole) if whole is not None else None]  # 0 unless something broke a mask
        if whole is not model:
            torch.distributed.broadcast_object_list(count, src=0)
        outside = count[0]
        zero = {stage: res["results"] for stage, res in zs.items()}
        wandb_summary(logger, {**{f"{stage}/ppl/{n}": v for stage, vals in ppl.items() for n, v in vals.items()},
                               **{f"{stage}/zs/{task}/{metric}": v for stage, tasks in zero.items()
                                  for task, metrics in tasks.items() for metric, v in metrics.items()},
                               **seconds, "nnz": report.nnz, "dense_numel": report.dense_numel,
                               "nonzeros_outside_masks": outside, "finetune_memory": finetune_memory})
        result: dict[str, Any] = {"identity": who, "version": __version__, "perplexity": ppl, **seconds,
                                  "prune_peak_memory": memory, "finetune_steps": steps,
                                  "finetune_memory": finetune_memory, "world_size": size,
                                  "nonzeros_outside_masks": outside,
                                  "protocol": prepared.protocol, "prune": report.totals(), "layers": report.to_rows(),
                                  "config": config.to_dict()}
        if zs:  # the scores by stage; lm-eval's version and the task versions in the protocol record
            result["zero_shot"] = zero
            result["protocol"] = {**prepared.protocol, "zero_shot": zero_shot_protocol(next(iter(zs.values())))}
        if rank == 0:
            result["exports"] = export_pruned(whole, prepared.tokenizer, out, config.export.packed,
                                              config.export.merged, config.export.packed_dtype)
            write_json(os.path.join(out, "results.json"), result)
            print(summary(run_name(who), ppl, seconds,
                          config.data.seq_len))
    finally:
        finish_wandb(logger)
    return result


def prepare_llama(config: LlamaRecipeConfig) -> LlamaPrepared:
    """Every input check of an LLM run and its parts, before any work: the strategy, the text files, the
    model (offline-aware), the sequence length, the prune against the model, every token window.

    Raises:
        ValueError: naming the flag and the value (a model that cannot be loaded, ``--seq-len`` beyond the
            context, too few calibration tokens, an empty or missing text file, ...).
    """
    data, run, ft = config.data, config.run, config.finetune
    if (run.strategy or "ddp") not in STRATEGIES:
        raise ValueError(f"--strategy {run.strategy!r} is not supported by the LLM recipe; use one of {STRATEGIES}")
    if run.strategy == "fsdp" and run.devices == 1 and run.num_nodes == 1:
        raise ValueError(FSDP_ONE_PROCESS)
    check_distill(config.distill, DISTILL_KINDS, ft.steps > 0)
    if config.zero_shot.tasks:  # names known, data reachable (local, or the hub online): before any work
        try:
            check_tasks(config.zero_shot.tasks, config.zero_shot.tasks_path)
        except ImportError as e:
            raise ValueError(f"--eval-tasks: {e}") from e
    if run.fast_dev_run or run.limit_batches is not None or run.limit_train_batches is not None:
        raise ValueError("run.fast_dev_run, run.limit_batches and run.limit_train_batches are not used by the LLM "
                         "recipe: quick runs use --finetune-steps, --calibration-samples, --eval-samples and --seq-len")
    world = run.devices * run.num_nodes if isinstance(run.devices, int) else None
    if world is not None and world > data.calibration_samples:
        raise ValueError(f"--calibration-samples {data.calibration_samples} is fewer than the {world} processes: "
                         f"every process calibrates on its share of the windows")
    calib_src = calibration_source(data.calibration, data.calibration_text)
    evals_src = eval_sources(data.eval, data.eval_text)
    model, tokenizer, source = load_causal_lm(config.model.name_or_path, config.model.dtype)
    context, where = model_context(model, tokenizer)
    seq_len = resolve_seq_len(data.seq_len, context, where)
    plan_prune(model, config.prune)
    if config.prune.sequential:
        decoder_blocks(model)
    if run.strategy == "fsdp":
        try:
            decoder_blocks(model)
        except ValueError as e:
            raise ValueError(f"--strategy fsdp shards the model by decoder block: {e}; use --strategy ddp") from e
    ft_windows = ft.steps * ft.batch_size * ft.accumulate_grad_batches * (world or 1)
    cap = max(4 * data.calibration_samples, ft_windows) * seq_len if calib_src.shuffle else None
    calibration, stream = calibration_windows(tokenizer, calib_src, seq_len, data.calibration_samples,
                                              config.prune.seed, max_tokens=cap)
    train = None
    if ft.steps > 0:
        train = consecutive_windows(stream, seq_len, what=f"fine-tuning text {calib_src.name!r}")
        need = ft.batch_size * (world or 1)
        if train.shape[0] < need:
            raise ValueError(f"the fine-tuning text {calib_src.name!r} gives {train.shape[0]} windows of {seq_len} "
                             f"tokens, fewer than one batch of --batch-size {ft.batch_size} on each of {world or 1} "
                             f"process(es); lower --batch-size or --seq-len, or give more --calibration-text")
    evals, eval_tokens = {}, {}
    for src in evals_src:
        evals[src.name], eval_tokens[src.name] = eval_windows(tokenizer, src, seq_len, data.eval_samples)
    name = model_short_name(config.model.name_or_path)
    config = replace(config, data=replace(data, seq_len=seq_len))
    config = with_output_dir(config, name, calib_src.name)
    protocol = protocol_record(config, name=name, model=model, source=source, context=(context, where),
                               calibration_source=calib_src, calibration=calibration, stream=stream,
                               eval_sources=evals_src, evals=evals, eval_tokens=eval_tokens, train=train)
    return LlamaPrepared(config, model, tokenizer, name, calib_src.name, calibration, train, evals, protocol)


def run_llama(config: LlamaRecipeConfig) -> dict[str, Any]:
    """:func:`prepare_llama` then :func:`execute_llama`."""
    return execute_llama(prepare_llama(config))


def llama_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``recipes/llama.py``; returns the exit status (2 for bad input)."""
    return recipe_main(llama_parser(), prepare_llama, execute_llama, argv)
