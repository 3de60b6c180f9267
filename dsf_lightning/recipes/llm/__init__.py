"""The LLM recipe (``recipes/llama.py``): its config and flags (:mod:`.config`) beside its run (:mod:`.run`)."""
