"""Distillation from the dense model: each loss on hand-computed tensors, the frozen teacher through training
(gradients None, weights unchanged, never in a checkpoint), masks exact, bad options named (issue 20)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from numerics import rel_bound
from torch.utils.data import DataLoader, TensorDataset

from dsf_lightning.distill import DistillConfig, Distiller, logit_kd, normalized_mse

pl = pytest.importorskip("lightning.pytorch")


def test_logit_kd_on_hand_computed_tensors():
    # teacher p = (3/4, 1/4), student uniform: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    s, t = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    # KL is a difference of logs: its rounding is relative to the terms p (|log p_t| + |log p_s|), not to KL;
    # each log-softmax is a few rounded operations deep (max, subtract, exp, sum, log)
    terms = 0.75 * (math.log(4 / 3) + math.log(2)) + 0.25 * (math.log(4) + math.log(2))
    tol = rel_bound(torch.float32, 8) * terms
    assert logit_kd(s, t).item() == pytest.approx(kl, abs=tol)
    # T = 2 on logits twice as large: the same distributions, times T^2
    assert logit_kd(2 * s, 2 * t, temperature=2.0).item() == pytest.approx(4 * kl, abs=4 * tol)
    # a masked-out position counts for nothing; a student equal to its teacher gives 0
    s2, t2 = torch.stack([s[0], torch.tensor([5.0, -5.0])])[None], torch.stack([t[0], torch.tensor([-5.0, 5.0])])[None]
    assert logit_kd(s2, t2, mask=torch.tensor([[True, False]])).item() == pytest.approx(kl, abs=tol)
    assert logit_kd(t2, t2).item() == 0.0


def test_normalized_mse_on_hand_computed_tensors():
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 0.0]])
    assert normalized_mse(s, t).item() == pytest.approx((1 + 4) / 2 / ((4 + 0) / 2), rel=rel_bound(torch.float32, 2))
    # (batch, seq, hidden) with a (batch, seq) mask: only the kept tokens' features count
    s3 = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])
    t3 = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    assert normalized_mse(s3, t3, torch.tensor([[1, 0]])).item() == pytest.approx(1.25, rel=rel_bound(torch.float32, 2))
    assert normalized_mse(t3, t3).item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "soft"}, r"distill kind must be one of \('none', 'logits'"),
    ({"kind": "logits", "weight": 1.5}, r"weight must be in \[0, 1\] .* for kind 'logits', got 1.5"),
    ({"kind": "squarehead", "weight": -1.0}, r"weight must be in >= 0 for kind 'squarehead'"),
    ({"kind": "logits", "temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ({"kind": "logits", "logit_weight": 0.5}, "logit_weight is the logit term beside squarehead/features"),
    ({"kind": "logits", "teacher_dtype": "int8"}, r"teacher_dtype must be one of \('float32', 'bfloat16'"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_distiller_errors_name_the_layer_and_the_missing_step():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="the teacher has no module 'model.blocks.0'"):
        Distiller(copy.deepcopy(model), DistillConfig("squarehead"), layers=["model.blocks.0"])
    with pytest.raises(ValueError, match="kind 'none' needs no teacher"):
        Distiller(model, DistillConfig("none"))
    distiller = Distiller(copy.deepcopy(model), DistillConfig("squarehead"))
    assert distiller.layers == ["model.layers.0", "model.layers.1"]
    with pytest.raises(RuntimeError, match=r"attach\(student\) must run before"):
        distiller(torch.zeros(1, 2, 96), input_ids=torch.zeros(1, 2, dtype=torch.long))


def test_a_student_equal_to_its_teacher_has_zero_terms():
    model = _tiny_llama().eval()
    distiller = Distiller(copy.deepcopy(model), DistillConfig("squarehead", logit_weight=1.0))
    distiller.attach(model)
    ids = torch.randint(0, 96, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    terms = distiller(logits, input_ids=ids, attention_mask=mask, mask=mask)
    assert set(terms) == {"kd", "squarehead"} and terms["kd"].item() == 0.0 and terms["squarehead"].item() == 0.0


def test_squarehead_fine_tune_keeps_the_teacher_frozen_and_the_masks_exact():
    """CausalLM with a SquareHead + logit distiller over a pruned tiny LLaMA: 3 AdamW steps. The teacher (bf16)
    has no gradients, equal weights after, is in no state dict; the masks stay exact; each term is logged and
    the loss is their total."""
    from dsf_lightning import prune
    from dsf_lightning.models import CausalLM
    from dsf_lightning.persistence.structure import nonzeros_outside_masks

    dense = _tiny_llama()
    student = copy.deepcopy(dense)
    prune(student, 0.5, "magnitude")
    distiller = Distiller(copy.deepcopy(dense), DistillConfig("squarehead", weight=2.0, logit_weight=0.5,
                                                              teacher_dtype="bfloat16"))
    before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    module = CausalLM(student, lr=1e-2, distiller=distiller)
    assert not any("teacher" in k for k in module.state_dict()) and len(module.state_dict()) == len(
        CausalLM(copy.deepcopy(student)).state_dict())
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(ids, batch_size=2))
    teacher = distiller.teacher
    assert all(p.grad is None and not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()) and not teacher.training
    assert nonzeros_outside_masks(student) == 0
    m = trainer.callback_metrics
    total = m["train/ce"] + 2.0 * m["train/squarehead"] + 0.5 * m["train/kd"]
    assert m["train_loss"].item() == pytest.approx(total.item(), rel=rel_bound(torch.float32, 4))
    assert m["train/squarehead"] > 0 and m["train/kd"] > 0


def test_feature_distillation_of_a_resnet20_classifier():
    """ImageClassifier with ``features`` (the layer<k> stages) and a logit term: 2 SGD steps; the teacher is
    unchanged and the three terms are logged."""
    from dsf_lightning import prune
    from dsf_lightning.models import ImageClassifier
    from dsf_lightning.models.resnet20 import resnet20

    torch.manual_seed(0)
    dense = resnet20(num_classes=10)
    student = copy.deepcopy(dense)
    prune(student, 0.3, "magnitude")
    distiller = Distiller(copy.deepcopy(dense).eval(), DistillConfig("features", logit_weight=1.0, temperature=2.0))
    assert distiller.layers == ["layer1", "layer2", "layer3"]
    before = copy.deepcopy(distiller.teacher.state_dict())
    module = ImageClassifier(student, 10, lr=0.05, lr_schedule="constant", distiller=distiller)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert all(torch.equal(before[k], v) for k, v in distiller.teacher.state_dict().items())  # BN stats too
    assert {"train/ce", "train/kd", "train/features"} <= set(trainer.callback_metrics)
    with pytest.raises(ValueError, match="ImageClassifier distills 'logits' or 'features', got 'squarehead'"):
        ImageClassifier(student, 10, distiller=Distiller(_tiny_llama(), DistillConfig("squarehead")))
