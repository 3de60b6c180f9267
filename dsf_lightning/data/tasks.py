"""Two lm-eval tasks over local text, written as task YAMLs and JSONL files: zero-shot accuracy with no hub.

>>> write_local_tasks("tasks/", wikipedia_texts()[-20:], n=100)   # held-out articles
['wiki_next_sentence', 'wiki_cloze']
>>> zero_shot(model, tokenizer, ["wiki_next_sentence", "wiki_cloze"], include_path="tasks/")

* ``wiki_next_sentence`` (multiple choice, ``acc`` / ``acc_norm``): a sentence of an article, and four
  candidates for the one after it: the true next sentence and three sentences drawn from other articles.
* ``wiki_cloze`` (loglikelihood, ``acc`` / ``perplexity``, like LAMBADA): a passage of an article without its
  last word; ``acc`` counts passages whose last word is the model's greedy continuation.

Documents are drawn with ``seed`` from the sentences of the given texts; the same texts and seed give the same
files.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LOCAL_TASKS", "write_local_tasks"]

LOCAL_TASKS = ("wiki_next_sentence", "wiki_cloze")

_MC_YAML = """task: wiki_next_sentence
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_CLOZE_YAML = """task: wiki_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _sentences(text: str) -> list[str]:
    """Sentences of 6 to 60 words (a split at ``. ``, ``! `` or ``? ``; lines joined)."""
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if 6 <= len(p.split()) <= 60 and p[-1] in ".!?"]


def write_local_tasks(folder: str | os.PathLike, texts: Sequence[str], n: int = 100, seed: int = 0) -> list[str]:
    """Write the two tasks (module docstring), ``n`` documents each at most, into ``folder``; returns their
    names. ``ValueError`` when ``texts`` hold too few sentences (fewer than 2 articles, or no pair)."""
    rng = random.Random(seed)
    articles = [s for s in (_sentences(t) for t in texts) if len(s) >= 2]
    if len(articles) < 2:
        raise ValueError(f"the texts hold {len(articles)} article(s) of 2+ sentences; the tasks need 2 or more")
    pairs = [(a, i) for a, sents in enumerate(articles) for i in range(len(sents) - 1)]
    rng.shuffle(pairs)
    mc = []
    for a, i in pairs[:n]:
        others = [s for b, sents in enumerate(articles) if b != a for s in sents]
        choices = [articles[a][i + 1], *rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        mc.append({"context": articles[a][i], "choices": [choices[k] for k in order], "label": order.index(0)})
    cloze = []
    for a, i in pairs[:n]:
        words = f"{articles[a][i]} {articles[a][i + 1]}".rstrip(".!?").split()
        cloze.append({"context": " ".join(words[:-1]), "target": words[-1]})
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs, yaml in (("wiki_next_sentence", mc, _MC_YAML), ("wiki_cloze", cloze, _CLOZE_YAML)):
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (out / f"{name}.yaml").write_text(yaml.format(data=json.dumps(str(data.resolve()))))
    return list(LOCAL_TASKS)
