"""Zero-shot accuracy with lm-eval on local tasks, for the model in memory; offline and bad-input errors (issue 21)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from dsf_lightning.data.tasks import LOCAL_TASKS, write_local_tasks
from dsf_lightning.zero_shot import check_tasks, expand_tasks, zero_shot

LIMIT = 12


@pytest.fixture(scope="module")
def two_blocks(smollm2):
    """SmolLM2 cut to its first 2 decoder blocks (a copy) and its tokenizer."""
    model, tok = smollm2
    cut = copy.deepcopy(model)
    cut.model.layers = cut.model.layers[:2]
    cut.config.num_hidden_layers = 2
    return cut.eval(), tok


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, wiki_texts):
    folder = tmp_path_factory.mktemp("tasks")
    assert write_local_tasks(folder, wiki_texts[-8:], n=LIMIT) == list(LOCAL_TASKS)
    return folder


def _choice_loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """Sum of log-probabilities of ``" " + choice`` after ``context``, split as lm-eval splits a pair."""
    out = []
    for choice in choices:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx):]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        out.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
    return out


def test_local_tasks_score_the_model_in_memory(two_blocks, tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = two_blocks
    result = zero_shot(model, tok, list(LOCAL_TASKS), include_path=tasks, limit=LIMIT, batch_size=4)
    assert result["versions"] == {t: 1.0 for t in LOCAL_TASKS} and result["limit"] == LIMIT
    assert result["lm_eval"].startswith("0.4.") and result["n_shot"] == {t: 0 for t in LOCAL_TASKS}
    mc, cloze = (result["results"][t] for t in LOCAL_TASKS)
    assert mc["samples"] == cloze["samples"] == LIMIT
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(mc) and {"acc", "perplexity"} <= set(cloze)
    # the accuracy is this model's: the same choices win when the log-likelihoods are computed here
    docs = [json.loads(line) for line in (tasks / "wiki_next_sentence.jsonl").read_text().splitlines()][:LIMIT]
    scores = [_choice_loglikelihoods(model, tok, d["context"], d["choices"]) for d in docs]
    wins = [max(range(4), key=s.__getitem__) == d["label"] for s, d in zip(scores, docs, strict=True)]
    assert mc["acc"] == pytest.approx(sum(wins) / LIMIT, abs=0.5 / LIMIT)
    assert mc["acc_stderr"] == pytest.approx((mc["acc"] * (1 - mc["acc"]) / (LIMIT - 1)) ** 0.5, rel=1e-6)


def test_the_local_tasks_are_the_same_for_the_same_texts_and_seed(tmp_path, wiki_texts):
    write_local_tasks(tmp_path / "a", wiki_texts[-8:], n=LIMIT)
    write_local_tasks(tmp_path / "b", wiki_texts[-8:], n=LIMIT)
    for name in LOCAL_TASKS:
        assert (tmp_path / "a" / f"{name}.jsonl").read_text() == (tmp_path / "b" / f"{name}.jsonl").read_text()
    doc = json.loads((tmp_path / "a" / "wiki_next_sentence.jsonl").read_text().splitlines()[0])
    assert len(doc["choices"]) == 4 and 0 <= doc["label"] < 4
    with pytest.raises(ValueError, match="the tasks need 2 or more"):
        write_local_tasks(tmp_path / "c", ["One sentence only here, no more, and that is all."], n=4)


def test_a_hub_task_while_offline_fails_naming_it_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert expand_tasks(["wanda", "boolq"])[:2] == ["boolq", "rte"] and len(expand_tasks(["wanda"])) == 7
    with pytest.raises(ValueError, match=r"task 'boolq' reads .* from the Hugging Face hub, which is offline.*"
                                         r"--eval-tasks-path DIR"):
        check_tasks(["wanda"])


def test_unknown_tasks_and_folders_are_named(tasks, tmp_path):
    with pytest.raises(ValueError, match=r"'wiki_clozee' is not an lm-eval task \(close: \['wiki_cloze'"):
        check_tasks(["wiki_clozee"], include_path=tasks)
    with pytest.raises(ValueError, match="is not a directory"):
        check_tasks(["wiki_cloze"], include_path=tmp_path / "missing")
    assert check_tasks(list(LOCAL_TASKS), include_path=tasks) == list(LOCAL_TASKS)


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'dsf-lightning\[eval\]'"):
        check_tasks(["wiki_cloze"])


def test_evaluate_names_a_saved_model_and_its_stage(two_blocks, tasks, tmp_path):
    """``python -m dsf_lightning.evaluate`` away from any run: a packed folder's identity comes from its pruned
    layers (method, achieved density), a plain save_pretrained folder is the dense model at stage ``dense``."""
    from dsf_lightning import prune
    from dsf_lightning.evaluate import evaluate_folder
    from dsf_lightning.models.causal_lm import PACKED_FILE
    from dsf_lightning.persistence.export import save_packed

    model, tok = two_blocks
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(["The river runs past the old mill and under the stone bridge."] * 40))
    dense_dir, packed_dir = tmp_path / "dense", tmp_path / "packed"
    model.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    pruned = copy.deepcopy(model)
    prune(pruned, 0.5, "magnitude", include=[r"model\.layers\.0\.mlp\..*"])
    save_packed(pruned, packed_dir / PACKED_FILE)
    pruned.config.save_pretrained(packed_dir)
    tok.save_pretrained(packed_dir)
    args = {"ppl": [str(text)], "seq_len": 32, "eval_samples": 2, "tasks": ["wiki_cloze"], "tasks_path": tasks,
            "limit": 3, "device": "cpu"}
    dense = evaluate_folder(dense_dir, **args)
    assert dense["identity"]["method"] == "dense" and dense["identity"]["density"] == 1.0
    assert dense["evaluated"]["stage"] == "dense" and dense["evaluated"]["kind"] == "pretrained"
    assert dense["protocol"]["eval"]["notes"]["windows"] == 2
    assert dense["zero_shot"]["dense"]["wiki_cloze"]["samples"] == 3
    got = evaluate_folder(packed_dir, **args)
    assert got["identity"]["method"] == "magnitude" and got["identity"]["density"] == 0.5
    assert got["evaluated"] == {"folder": str(packed_dir), "kind": "packed", "stage": "post_finetune", "run": None}
    assert got["perplexity"]["post_finetune"]["notes"] != dense["perplexity"]["dense"]["notes"]  # the prune shows


def test_evaluate_bad_input_exits_2_naming_it(tmp_path, capsys):
    from dsf_lightning.evaluate import main

    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "neither a packed export" in capsys.readouterr().err
    assert not (tmp_path.parent / f"evaluation-{tmp_path.name}").exists()  # nothing written
    assert main([str(tmp_path), "--ppl", "wikitext3"]) == 2
    assert "--ppl 'wikitext3' is neither an evaluation dataset" in capsys.readouterr().err
