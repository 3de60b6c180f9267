"""The LLM half end to end: text -> windows, the sequence-length rule, perplexity equal to a direct transformers
evaluation, CausalLM (schedules, masks exact through AdamW steps, bf16-mixed), the recipe on a tiny random LLaMA
(single process, W&B offline record, exports reloaded by plain transformers, 2-process DDP/gloo) and on the real
SmolLM2 cut to 2 blocks, bad input failing before any work.

Models: a tiny random ``LlamaForCausalLM`` (hidden 64, 2 blocks, context 256) with SmolLM2's real tokenizer,
saved with ``save_pretrained`` so the recipe loads it as ``--model FOLDER``; and the real SmolLM2-135M cut to
its first 2 blocks. The DDP run executes this file as a script (``python tests/test_llm.py <recipe args>``):
Lightning's launcher starts it again for rank 1.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAST = '{"outer_iters": 2}'

if __name__ == "__main__":  # the DDP test's script: python tests/test_llm.py <recipe arguments>
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    from dsf_lightning.recipes import llama_main

    sys.exit(llama_main(sys.argv[1:]))

pl = pytest.importorskip("lightning.pytorch")

from numerics import block_depth, perplexity_rel_bound, rel_bound  # noqa: E402  (tests/ is on sys.path)
from wandb_offline import wandb_records  # noqa: E402  (tests/ is on sys.path)

from dsf_lightning.data import text as textdata  # noqa: E402
from dsf_lightning.models import CausalLM, load_causal_lm, load_packed_causal_lm  # noqa: E402
from dsf_lightning.models.causal_lm import lr_factor  # noqa: E402
from dsf_lightning.perplexity import perplexity, text_perplexity  # noqa: E402
from dsf_lightning.recipes import llama_main, llama_parser  # noqa: E402


# ------------------------------------------------------------------------------------------------
# models and text
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A random tiny LLaMA (tied embeddings, context 256) + SmolLM2's tokenizer, as save_pretrained writes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                      tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def smollm2_blocks(n: int):
    """The real SmolLM2-135M cut to its first ``n`` decoder blocks (a fresh copy)."""
    from dsf_lightning.data import load_smollm2

    model, tok = load_smollm2()
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    return model, tok


@pytest.fixture(scope="session")
def smol2_dir(tmp_path_factory):
    model, tok = smollm2_blocks(2)
    folder = tmp_path_factory.mktemp("smollm2-2blocks")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def texts(tmp_path_factory, wiki_texts):
    """Small local calibration / evaluation files cut from different Wikipedia articles."""
    folder = tmp_path_factory.mktemp("texts")
    paths = {}
    for name, article in (("calib", wiki_texts[0]), ("heldout", wiki_texts[2]), ("other", wiki_texts[5])):
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text(article[:20000])
    (folder / "empty.txt").write_text("  \n")
    paths["empty"] = folder / "empty.txt"
    return {k: str(v) for k, v in paths.items()}


def direct_perplexity(model, windows: torch.Tensor) -> tuple[float, float]:
    """A direct transformers evaluation: one window at a time, the loss of ``labels=input_ids``; with the
    largest logit's magnitude (the scale of perplexity's rounding bound)."""
    with torch.no_grad():
        outs = [model(input_ids=w[None], labels=w[None]) for w in windows]
    scale = max(float(o.logits.abs().max()) for o in outs)
    return math.exp(torch.stack([o.loss for o in outs]).mean().item()), scale


def fp32_depth(cfg, factored: bool = False) -> int:
    """Longest chain of fp32 accumulations from the embeddings to the logits; a factored layer's
    ``x F^T S^T`` chains ``fan_in + rank <= 2 fan_in`` terms."""
    return (1 + factored) * cfg.num_hidden_layers * block_depth(cfg.hidden_size, cfg.intermediate_size) \
        + cfg.hidden_size


# ------------------------------------------------------------------------------------------------
# perplexity, windows, the sequence-length rule
# ------------------------------------------------------------------------------------------------
def test_dense_perplexity_equals_a_direct_transformers_evaluation(texts):
    model, tok = smollm2_blocks(2)  # real weights
    text = open(texts["heldout"]).read()
    ids = textdata.tokenize_text(tok, text)
    assert torch.equal(ids, tok(text, return_tensors="pt").input_ids[0])
    windows = textdata.consecutive_windows(ids, 128, max_windows=5)
    assert torch.equal(windows.flatten(), ids[: 5 * 128])  # consecutive, non-overlapping
    expected, scale = direct_perplexity(model, windows)
    rel = perplexity_rel_bound(torch.float32, fp32_depth(model.config), scale)
    for batch_size in (1, 2, 8):  # other batches: other kernels, the same exact arithmetic
        got = perplexity(model, windows, batch_size=batch_size)
        assert got.perplexity == pytest.approx(expected, rel=rel)
        assert (got.windows, got.tokens, got.seq_len) == (5, 5 * 127, 128)
    assert text_perplexity(model, tok, text, 128, max_windows=5).perplexity == pytest.approx(expected, rel=rel)
    assert math.isfinite(expected) and expected > 1  # 2 of 30 blocks: a poor model, a real computation


def test_context_and_sequence_length_rule(tiny_dir, smollm2):
    model, tok = smollm2
    ctx, where = textdata.model_context(model, tok)  # the GGUF-derived config: 8192 ("8k" model); no tokenizer limit
    assert (ctx, where) == (8192, "config.max_position_embeddings (the tokenizer sets no limit)")
    tiny, tiny_tok, _ = load_causal_lm(tiny_dir)
    assert textdata.model_context(tiny, tiny_tok)[0] == 256
    tiny_tok.model_max_length = 128  # a tokenizer limit below the config's wins
    assert textdata.model_context(tiny, tiny_tok) == (128, "tokenizer.model_max_length")
    assert textdata.resolve_seq_len(None, 8192, "x") == 2048 and textdata.resolve_seq_len(None, 256, "x") == 256
    assert textdata.resolve_seq_len(100, 256, "x") == 100
    with pytest.raises(ValueError, match=r"--seq-len 512 is beyond the model's context of 256 tokens \(cfg\); use "
                                         r"--seq-len 256 or less"):
        textdata.resolve_seq_len(512, 256, "cfg")
    with pytest.raises(ValueError, match="pass --seq-len"):
        textdata.resolve_seq_len(None, None, "no limit known")


def test_windows_are_disjoint_seeded_and_errors_name_the_fix():
    stream = torch.arange(1000)
    w = textdata.random_windows(stream, 50, 10, seed=3, what="x")
    assert w.shape == (10, 50) and len(set(w.flatten().tolist())) == 500  # disjoint
    assert torch.equal(w, textdata.random_windows(stream, 50, 10, seed=3, what="x"))
    assert not torch.equal(w, textdata.random_windows(stream, 50, 10, seed=4, what="x"))
    assert textdata.random_windows(stream, 50, 20, seed=0, what="x").shape == (20, 50)  # exactly enough tokens
    with pytest.raises(ValueError, match=r"calibration text 'a' gives 1000 tokens, fewer than the 21 x 50 = 1050.*"
                                         r"lower --calibration-samples or --seq-len"):
        textdata.random_windows(stream, 50, 21, seed=0, what="calibration text 'a'")
    assert textdata.consecutive_windows(stream, 300).shape == (3, 300)  # the tail of 100 is dropped
    with pytest.raises(ValueError, match="has 1000 tokens, fewer than one window of --seq-len 2048"):
        textdata.consecutive_windows(stream, 2048)


def test_offline_default_splits_calibration_and_evaluation_articles():
    calib, evaluation = textdata.wikipedia_split()
    assert len(calib) == 71 and len(evaluation) == 35 and not set(calib) & set(evaluation)
    src = textdata.eval_sources()
    assert [s.name for s in src] == ["wikipedia"] and "i % 3 == 2" in src[0].origin
    assert textdata.calibration_source().name == "wikipedia"


def test_text_files_and_dataset_sources(texts, monkeypatch):
    src = textdata.eval_sources(None, [texts["heldout"], texts["other"]])
    assert [s.name for s in src] == ["heldout", "other"]  # --eval-text alone replaces the default
    with pytest.raises(ValueError, match=r"--eval-text '.*empty.txt' is empty"):
        textdata.eval_sources(None, [texts["empty"]])
    with pytest.raises(ValueError, match=r"--calibration-text '.*nope.txt': no such file"):
        textdata.calibration_source(None, [texts["calib"] + ".nope.txt"])
    with pytest.raises(ValueError, match="two files are named 'calib'"):
        textdata.calibration_source(None, [texts["calib"], texts["calib"]])

    import datasets

    def fake_load(path, *args, split=None, **kwargs):
        if os.environ.get("FAKE_OFFLINE"):
            raise ConnectionError("no network")
        return {"text": [f"{path} {split} document {i}. " * 20 for i in range(30)]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    wt2, c4 = textdata.eval_sources(["wikitext2", "c4"])
    assert wt2.docs[0].startswith("Salesforce/wikitext test") and c4.joiner == " " and c4.max_windows == 256
    c4_calib = textdata.calibration_source("c4")
    assert c4_calib.shuffle and c4_calib.docs[0].startswith("allenai/c4 train")
    monkeypatch.setenv("FAKE_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"--eval wikitext2: could not load .*ConnectionError: no network.*"
                                         r"offline, use the embedded default 'wikipedia' or local text files"):
        _ = textdata.eval_sources(["wikitext2"])[0].docs


# ------------------------------------------------------------------------------------------------
# CausalLM
# ------------------------------------------------------------------------------------------------
def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]  # warmup
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5) and lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "linear", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        CausalLM(torch.nn.Linear(2, 2), lr_schedule="step")


@pytest.mark.parametrize("method", ["dsf", "magnitude"])
def test_masks_stay_exact_through_adamw_fine_tuning(tiny_dir, method, tmp_path):
    """Real optimizer steps (AdamW with weight decay, warmup + linear decay, gradient clipping, bf16-mixed autocast) on
    the pruned tiny model: every masked entry is exactly zero afterwards, the masks did not move, weights did."""
    from dsf_lightning import PruneConfig, prune
    from dsf_lightning.data.text import TextDataModule
    from dsf_lightning.persistence.structure import pruned_modules

    model, _, _ = load_causal_lm(tiny_dir)
    calib = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    prune(model, PruneConfig(density=0.5, method=method, sequential=True, calibration_batches=None,
                             factorization_options={"outer_iters": 2} if method == "dsf" else {}),
          calibration=list(calib.split(2)), forward=lambda m, ids: m(input_ids=ids, use_cache=False), progress=False)
    def masked() -> dict:
        return {f"{n}.{i}": (p, m) for n, layer in pruned_modules(model) for i, (p, m) in
                enumerate(layer.masked_parameters())}

    before = {k: (p.detach().clone(), m.clone()) for k, (p, m) in masked().items()}
    assert len(before) == 14 * (2 if method == "dsf" else 1)
    train = torch.randint(0, 1000, (16, 32), generator=torch.Generator().manual_seed(1))
    module = CausalLM(model, lr=1e-2, weight_decay=0.1, warmup_steps=2, gradient_checkpointing=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, precision="bf16-mixed", gradient_clip_val=1.0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=TextDataModule(train, train[:4], batch_size=4))
    assert trainer.global_step == 6
    after = masked()
    moved = 0
    for k, (p0, m0) in before.items():
        p, m = after[k]
        assert torch.equal(m, m0), k
        assert int(torch.count_nonzero(p[~m])) == 0, k  # exactly zero outside the mask
        moved += int(not torch.equal(p, p0))
    assert moved == len(before)
    opt = trainer.optimizers[0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # decay on matrices, not on norms
    metrics = trainer.validate(module, datamodule=TextDataModule(train, train[:4], batch_size=4), verbose=False)[0]
    # two token-weighted means of the same batch losses (a few rounded ops each), then an fp32 exp
    rel = math.expm1(abs(metrics["val_loss"]) * rel_bound(torch.float32, 4)) + rel_bound(torch.float32, 1)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=rel)
    # a checkpoint carries the pruned structure: it loads into a fresh dense model
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = CausalLM.load_from_checkpoint(tmp_path / "last.ckpt", model=load_causal_lm(tiny_dir)[0])
    assert loaded.state_dict().keys() == module.state_dict().keys()
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items())


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------
def _args(model_dir: str, out, *extra: str) -> list[str]:
    fast = [] if "--method" in extra else ["--factorization-options", FAST]  # DSF's options
    return ["--model", model_dir, "--seq-len", "64", "--calibration-samples", "8", "--eval-samples", "4", *fast,
            "--accelerator", "cpu", "--output-dir", str(out), "--no-progress-bar", *extra]


def test_recipe_end_to_end_on_a_tiny_llama(tiny_dir, tmp_path, monkeypatch):
    """Offline default text, DSF at 0.5, 8 fine-tuning steps; W&B offline; both exports reload with the
    pruned model's perplexity (the merged one through plain transformers)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code = llama_main(_args(tiny_dir, out, "--finetune-steps", "8", "--batch-size", "4", "--lr", "3e-3",
                            "--seed", "2", "--val-every", "4", "--wandb", "offline", "--wandb-dir", str(tmp_path)))
    assert code == 0
    result = json.load(open(out / "results.json"))
    ppl = result["perplexity"]
    assert set(ppl) == {"dense", "pre_finetune", "post_finetune"} and set(ppl["dense"]) == {"wikipedia"}
    assert ppl["post_finetune"]["wikipedia"] < ppl["pre_finetune"]["wikipedia"]  # a random model learns the text
    assert result["prune_seconds"] > 0 and result["finetune_steps"] == 8 and result["world_size"] == 1
    assert result["prune_peak_memory"]["rss_bytes"] > 100 * 2**20  # at least the interpreter and torch
    assert 0 < result["prune"]["working_set_bytes"] < result["prune_peak_memory"]["rss_bytes"]
    proto = result["protocol"]
    assert proto["model"]["context"] == 256 and proto["seq_len"] == 64 and proto["model"]["decoder_blocks"] == 2
    assert proto["calibration"]["tokens"] == 8 * 64 and proto["calibration"]["text"] == "wikipedia"
    assert proto["eval"]["wikipedia"]["windows"] == 4 and proto["eval"]["wikipedia"]["scored_tokens"] == 4 * 63
    assert proto["versions"]["transformers"] and proto["versions"]["torch"] and result["prune"]["layers"] == 14
    assert result["config"]["data"]["seq_len"] == 64
    # W&B: the conventions of the vision recipes
    rec = wandb_records(tmp_path)
    assert rec["run"]["name"] == f"{proto['model']['name']}-dsf-d0.5-s2"
    assert rec["run"]["group"].endswith("-wikipedia") and rec["run"]["project"] == "dsf-llm"
    assert {proto["model"]["name"], "dsf", "density=0.5", "allocation=uniform"} <= set(rec["run"]["tags"])
    assert rec["config"]["identity"] == result["identity"] and result["identity"]["seed"] == 2
    assert rec["summary"]["post_finetune/ppl/wikipedia"] == ppl["post_finetune"]["wikipedia"]  # the same floats
    assert rec["summary"]["prune_seconds"] == result["prune_seconds"]
    assert rec["config"]["prune"]["method"] == "dsf" and rec["config"]["protocol"]["seq_len"] == 64
    for stage in ("dense", "pre_finetune", "post_finetune"):
        assert rec["history"][f"{stage}/ppl/wikipedia"] == ppl[stage]["wikipedia"]
    assert "train_loss" in rec["history"] and "val_ppl" in rec["history"] and "dsf/achieved_density" in rec["history"]
    # exports: the same perplexity as the pruned, fine-tuned model on the same windows
    tok = load_causal_lm(tiny_dir)[1]
    windows, _ = textdata.eval_windows(tok, textdata.eval_sources()[0], 64, 4)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    want, scale = ppl["post_finetune"]["wikipedia"], direct_perplexity(merged, windows)[1]
    fp32 = perplexity_rel_bound(torch.float32, fp32_depth(merged.config, factored=True), scale)
    assert perplexity(merged, windows).perplexity == pytest.approx(want, rel=fp32)
    packed, _ = load_packed_causal_lm(out / "packed")
    # fp16 values: one rounding of each weight, 4 weights deep per block (v, o, up, down) plus the tied embedding
    fp16 = perplexity_rel_bound(torch.float16, 4 * merged.config.num_hidden_layers + 2, scale, computations=1)
    assert perplexity(packed, windows).perplexity == pytest.approx(want, rel=fp16 + fp32)
    assert llama_parser().parse(["--config", str(out / "config.yaml")]).to_dict() == result["config"]


def test_merged_export_has_exact_zeros_and_no_finetuning_means_post_equals_pre(tiny_dir, texts, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert llama_main(_args(tiny_dir, out, "--method", "magnitude", "--density", "0.3", "--calibration-text",
                            texts["calib"], "--eval-text", texts["heldout"], "--eval-text", texts["other"],
                            "--wandb", "off", "--no-save-packed")) == 0
    result = json.load(open(out / "results.json"))
    assert set(result["perplexity"]["dense"]) == {"heldout", "other"}
    assert result["perplexity"]["post_finetune"] == result["perplexity"]["pre_finetune"]
    assert result["finetune_steps"] == 0 and "finetune_seconds" not in result
    assert not (out / "packed").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    w = merged.model.layers[1].mlp.down_proj.weight  # (64, 128): floor(0.3 * 64 * 128) = 2457 kept, exact zeros else
    assert int((w != 0).sum()) == 2457
    tok = load_causal_lm(tiny_dir)[1]
    got = text_perplexity(merged, tok, open(texts["other"]).read(), 64, max_windows=4).perplexity
    windows = textdata.consecutive_windows(textdata.tokenize_text(tok, open(texts["other"]).read()), 64, 4)
    # the same masked weights, other batches: fp32 rounding of the dense depth
    rel = perplexity_rel_bound(torch.float32, fp32_depth(merged.config), direct_perplexity(merged, windows)[1])
    assert got == pytest.approx(result["perplexity"]["pre_finetune"]["other"], rel=rel)
    # a sweep's later runs skip the dense pass: same pruned result, no dense entry
    again = tmp_path / "again"
    assert llama_main(_args(tiny_dir, again, "--method", "magnitude", "--density", "0.3", "--calibration-text",
                            texts["calib"], "--eval-text", texts["other"], "--wandb", "off", "--no-save-packed",
                            "--no-save-merged", "--no-eval-dense")) == 0
    skipped = json.load(open(again / "results.json"))["perplexity"]
    assert "dense" not in skipped and skipped["pre_finetune"]["other"] == result["perplexity"]["pre_finetune"]["other"]


def test_recipe_scores_local_zero_shot_tasks_at_every_stage(tiny_dir, tmp_path, monkeypatch, wiki_texts):
    """--eval-tasks over local task YAMLs: lm-eval at dense / pruned / fine-tuned, in results.json with the
    versions in the protocol record, and in the W&B summary; ``python -m dsf_lightning.evaluate`` on the float32
    packed export repeats the run's final numbers bit for bit, and dsf-compare shows it beside the run."""
    from dsf_lightning.data.tasks import write_local_tasks
    from dsf_lightning.evaluate import main as evaluate_main
    from dsf_lightning.runs.records import find_runs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = write_local_tasks(tmp_path / "tasks", wiki_texts[-6:], n=4)
    out = tmp_path / "out"
    assert llama_main(_args(tiny_dir, out, "--finetune-steps", "2", "--batch-size", "2", "--wandb", "offline",
                            "--wandb-dir", str(tmp_path), "--eval-tasks", names[0], "--eval-tasks", names[1],
                            "--eval-tasks-path", str(tmp_path / "tasks"), "--eval-tasks-limit", "4",
                            "--packed-dtype", "float32")) == 0
    result = json.load(open(out / "results.json"))
    zs = result["zero_shot"]
    assert set(zs) == {"dense", "pre_finetune", "post_finetune"} and all(set(v) == set(names) for v in zs.values())
    assert all(zs[s][names[0]]["samples"] == 4 and 0 <= zs[s][names[0]]["acc"] <= 1 for s in zs)
    assert zs["dense"][names[1]]["perplexity"] != zs["pre_finetune"][names[1]]["perplexity"]  # the prune shows
    proto = result["protocol"]["zero_shot"]
    assert proto["versions"] == {n: 1.0 for n in names} and proto["lm_eval"].startswith("0.4.") and proto["limit"] == 4
    summary = wandb_records(tmp_path)["summary"]
    assert summary[f"post_finetune/zs/{names[0]}/acc"] == zs["post_finetune"][names[0]]["acc"]
    # the stand-alone evaluator: every default from the run's results.json, the same numbers exactly
    assert evaluate_main([str(out / "packed"), "--no-progress-bar"]) == 0
    again = json.load(open(out / "evaluation-packed" / "results.json"))
    assert again["evaluated"]["kind"] == "packed" and again["identity"] == result["identity"]
    assert again["perplexity"] == {"post_finetune": result["perplexity"]["post_finetune"]}
    assert again["zero_shot"] == {"post_finetune": zs["post_finetune"]}
    assert again["protocol"]["eval"] == result["protocol"]["eval"]
    methods = {r.method: r for r in find_runs([out])}
    assert set(methods) == {"dsf+outer_iters=2", "dsf+outer_iters=2@packed"}
    assert methods["dsf+outer_iters=2@packed"].metrics["post_finetune"] == methods["dsf+outer_iters=2"].metrics[
        "post_finetune"]
    # the merged export: plain transformers, its own kind; the merged product rounds differently (fp32, depth)
    assert evaluate_main([str(out / "merged"), "--no-progress-bar", "--tasks", names[1], "--tasks-limit", "2"]) == 0
    merged = json.load(open(out / "evaluation-merged" / "results.json"))
    assert merged["evaluated"]["kind"] == "merged" and set(merged["zero_shot"]["post_finetune"]) == {names[1]}
    model, tok, _ = load_causal_lm(str(out / "merged"))
    scale = direct_perplexity(model, textdata.eval_windows(tok, textdata.eval_sources()[0], 64, 4)[0])[1]
    rel = perplexity_rel_bound(torch.float32, fp32_depth(model.config, factored=True), scale)
    want = result["perplexity"]["post_finetune"]["wikipedia"]
    assert merged["perplexity"]["post_finetune"]["wikipedia"] == pytest.approx(want, rel=rel)


def test_recipe_ddp_two_processes(tiny_dir, texts, tmp_path, wiki_texts):
    """2 gloo processes: pruning shared (Grams all-reduced, layers split), sharded evaluation, a DDP fine-tune;
    the dense perplexity and zero-shot scores equal the single-process run's (every rank scores every
    zero-shot document: the same numbers, no rank waiting on another)."""
    from dsf_lightning.data.tasks import write_local_tasks

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    tasks = write_local_tasks(tmp_path / "tasks", wiki_texts[-6:], n=3)
    common = ["--calibration-text", texts["calib"], "--eval-text", texts["heldout"], "--finetune-steps", "3",
              "--batch-size", "2", "--wandb", "off", "--eval-tasks", tasks[0], "--eval-tasks-path",
              str(tmp_path / "tasks"), "--eval-tasks-limit", "3"]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                           *_args(tiny_dir, tmp_path / "ddp", "--devices", "2", *common)],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ddp = json.load(open(tmp_path / "ddp" / "results.json"))
    assert ddp["world_size"] == 2 and ddp["finetune_steps"] == 3 and ddp["config"]["run"]["strategy"] is None
    assert llama_main(_args(tiny_dir, tmp_path / "one", *common)) == 0
    one = json.load(open(tmp_path / "one" / "results.json"))
    # the same windows, scored in other batches: fp32 rounding of the dense depth
    model, tok, _ = load_causal_lm(tiny_dir)
    windows = textdata.consecutive_windows(textdata.tokenize_text(tok, open(texts["heldout"]).read()), 64, 4)
    dense_rel = perplexity_rel_bound(torch.float32, fp32_depth(model.config), direct_perplexity(model, windows)[1])
    assert ddp["perplexity"]["dense"]["heldout"] == pytest.approx(one["perplexity"]["dense"]["heldout"], rel=dense_rel)
    # Convergence, not rounding: each rank's Gram is summed in another order, and ADMM amplifies that rounding
    # through 14 layers' solves; the pruned models agree to 1e-3, far below what a wrong all-reduce moves (>1e-1)
    assert ddp["perplexity"]["pre_finetune"]["heldout"] == pytest.approx(one["perplexity"]["pre_finetune"]["heldout"],
                                                                         rel=1e-3)
    assert {row["owner_rank"] for row in ddp["layers"]} == {0, 1}  # the layers were split across the ranks
    assert set(ddp["zero_shot"]) == {"dense", "pre_finetune", "post_finetune"}
    assert ddp["zero_shot"]["dense"] == one["zero_shot"]["dense"]  # the same model, documents and batches
    assert (tmp_path / "ddp" / "merged" / "config.json").is_file()


def test_recipe_fsdp_two_processes(tiny_dir, texts, tmp_path, wiki_texts):
    """--strategy fsdp on 2 gloo processes: the pruned model fine-tunes sharded by decoder block (distilling from
    the dense teacher, sharded alike, held in bf16), is scored
    sharded (perplexity, and zero-shot with every rank running every document in lock step), and is gathered on
    rank 0 for the exports, which score what the sharded model scored."""
    from transformers import AutoModelForCausalLM

    from dsf_lightning.data.tasks import write_local_tasks
    from dsf_lightning.evaluate import evaluate_folder

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    out = tmp_path / "fsdp"
    cloze = write_local_tasks(tmp_path / "tasks", wiki_texts[-6:], n=3)[1]
    # 3 evaluation windows on 2 ranks: one rank scores fewer and must still run every sharded forward
    proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                           *_args(tiny_dir, out, "--devices", "2", "--strategy", "fsdp", "--calibration-text",
                                  texts["calib"], "--eval-text", texts["heldout"], "--eval-samples", "3",
                                  "--finetune-steps", "3", "--batch-size", "2", "--wandb", "off", "--no-eval-dense",
                                  "--eval-tasks", cloze, "--eval-tasks-path", str(tmp_path / "tasks"),
                                  "--packed-dtype", "float32", "--distill", "squarehead", "--distill-logit-weight",
                                  "0.5", "--teacher-dtype", "bfloat16")],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.load(open(out / "results.json"))
    assert result["world_size"] == 2 and result["finetune_steps"] == 3 and result["config"]["run"]["strategy"] == "fsdp"
    assert result["config"]["distill"]["kind"] == "squarehead"
    assert result["nonzeros_outside_masks"] == 0
    ppl = result["perplexity"]
    assert ppl["post_finetune"]["heldout"] != ppl["pre_finetune"]["heldout"]  # it trained
    tok = load_causal_lm(tiny_dir)[1]
    windows = textdata.consecutive_windows(textdata.tokenize_text(tok, open(texts["heldout"]).read()), 64, 3)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    fp32 = perplexity_rel_bound(torch.float32, fp32_depth(merged.config, factored=True),
                                direct_perplexity(merged, windows)[1])
    assert perplexity(merged, windows).perplexity == pytest.approx(ppl["post_finetune"]["heldout"], rel=fp32)
    packed, _ = load_packed_causal_lm(out / "packed")  # float32 values: the weights exactly
    assert perplexity(packed, windows).perplexity == pytest.approx(ppl["post_finetune"]["heldout"], rel=fp32)
    # the sharded model's zero-shot scores are the whole model's (the same logits)
    zs = evaluate_folder(out / "packed", device="cpu")["zero_shot"]["post_finetune"]
    assert zs == result["zero_shot"]["post_finetune"] and zs[cloze]["samples"] == 3


@pytest.mark.slow
def test_finetuning_the_pruned_real_model_lowers_held_out_perplexity(smol2_dir, tmp_path):
    """SmolLM2 cut to 2 blocks, DSF at 0.5 on Wikipedia calibration windows, 8 AdamW steps on the calibration
    articles: held-out perplexity (other articles) goes down; the dense number is a direct transformers one."""
    out = tmp_path / "out"
    assert llama_main(["--model", smol2_dir, "--seq-len", "128", "--calibration-samples", "4", "--eval-samples", "4",
                       "--factorization-options", '{"outer_iters": 2}', "--finetune-steps", "8", "--batch-size", "2",
                       "--lr", "2e-4", "--warmup-steps", "2", "--accelerator", "cpu", "--output-dir", str(out),
                       "--wandb", "off", "--no-progress-bar", "--no-save-packed", "--no-save-merged"]) == 0
    ppl = json.load(open(out / "results.json"))["perplexity"]
    pre, post = ppl["pre_finetune"]["wikipedia"], ppl["post_finetune"]["wikipedia"]
    assert post < pre and ppl["dense"]["wikipedia"] < pre
    model, tok, _ = load_causal_lm(smol2_dir)
    windows, _ = textdata.eval_windows(tok, textdata.eval_sources()[0], 128, 4)
    expected, scale = direct_perplexity(model, windows)
    rel = perplexity_rel_bound(torch.float32, fp32_depth(model.config), scale)
    assert ppl["dense"]["wikipedia"] == pytest.approx(expected, rel=rel)


# ------------------------------------------------------------------------------------------------
# bad input: clear errors before any work
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if pruning or any Trainer.fit starts."""
    import dsf_lightning.recipes.llm.run as llm_run

    def fail(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(llm_run, "prune", fail)
    monkeypatch.setattr(pl.Trainer, "fit", fail)


def test_bad_input(tiny_dir, texts, tmp_path, monkeypatch, no_work, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "out")

    def err(*args: str) -> str:
        assert llama_main(["--output-dir", out, "--wandb", "off", *args]) == 2
        return capsys.readouterr().err

    e = err("--model", "no-such-org/no-such-model")
    assert "--model 'no-such-org/no-such-model': could not load it offline (HF_HUB_OFFLINE=1" in e
    assert "Pass a local folder written by save_pretrained" in e and "--model /path/to/" in e
    e = err("--model", tiny_dir, "--seq-len", "512")
    assert "--seq-len 512 is beyond the model's context of 256 tokens (config.max_position_embeddings" in e
    e = err("--model", tiny_dir, "--calibration-text", texts["calib"])  # 128 x 256 tokens wanted
    assert "calibration text 'calib' (local files" in e and "fewer than the 128 x 256 = 32768 needed" in e
    e = err("--model", tiny_dir, "--eval-text", texts["empty"])
    assert "--eval-text" in e and "empty.txt' is empty" in e
    e = err("--model", tiny_dir, "--seq-len", "64", "--calibration-samples", "4", "--eval-text", texts["heldout"],
            "--eval-samples", "0")
    assert "data: eval_samples must be an int >= 1 or None, got 0 (see --eval-samples)" in e
    e = err("--model", str(tmp_path))
    assert "is a folder without config.json" in e
    e = err("--model", tiny_dir, "--eval-tasks", "wanda")  # hub tasks while offline: before the model loads
    assert "zero-shot task 'boolq' reads" in e and "--eval-tasks-path DIR" in e
    e = err("--model", tiny_dir, "--eval-tasks", "wiki_clozee", "--eval-tasks-path", str(tmp_path))
    assert "'wiki_clozee' is not an lm-eval task" in e
    e = err("--model", tiny_dir, "--distill", "squarehead")  # no fine-tuning: nothing to distill into
    assert "--distill squarehead distills while fine-tuning, and this run does not fine-tune" in e
    e = err("--model", tiny_dir, "--distill", "squarehead", "--distill-temperature", "0", "--finetune-steps", "2")
    assert "distill temperature must be > 0, got 0.0" in e
    e = err("--model", tiny_dir, "--strategy", "fsdp")  # one process: nothing to shard across
    assert "--strategy fsdp shards the model across processes, and this run has one" in e
    with pytest.raises(SystemExit) as exit_:
        llama_main(["--strategy", "deepspeed"])
    assert exit_.value.code == 2 and "invalid choice: 'deepspeed'" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_print_config_round_trips(tmp_path, no_work, capsys):
    flags = ["--calibration-text", "a.txt", "--calibration-text", "b.txt", "--eval", "wikitext2", "--eval", "c4",
             "--method", "magnitude", "--density", "0.4", "--seed", "3", "--finetune-steps", "100", "--no-save-packed"]
    with pytest.raises(SystemExit) as e:
        llama_main(["--print-config", *flags])
    assert e.value.code == 0
    (tmp_path / "run.yaml").write_text(capsys.readouterr().out)
    config = llama_parser().parse(flags)
    assert llama_parser().parse(["--config", str(tmp_path / "run.yaml")]) == config
    assert config.data.calibration_text == ("a.txt", "b.txt") and config.data.eval == ("wikitext2", "c4")
    assert config.prune.sequential and config.prune.seed == 3 and config.finetune.warmup == 10
    assert not config.export.packed and config.export.merged
