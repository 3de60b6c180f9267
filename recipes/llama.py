"""Prune a causal LM (LLaMA family) with DSF (or any registered method), evaluate and fine-tune it; ``--help`` for all.

    python recipes/llama.py                                              # offline SmolLM2-135M, Wikipedia text
    python recipes/llama.py --model meta-llama/Llama-2-7b-hf --calibration c4 --eval wikitext2 --density 0.5

The logic lives in :mod:`dsf_lightning.recipes.llm` (``llama_main``); ``--print-config`` shows a run's
config as YAML and ``--config FILE.yaml`` reads one back.
"""

import sys

from dsf_lightning.recipes import llama_main

if __name__ == "__main__":
    sys.exit(llama_main())
