# sdxl-bench: `make test` and `make bench` each set up .venv first on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# `make bench` is the whole experiment on the embedded tiny models, offline, on the CPU: SDXL's own "wrong"
# images, a LoRA trained on them, the three variants over the built-in prompts and two seeds, scores, report.
TINY := reports/tiny-wrong
RUN_ID ?= bench-$(shell date +%Y%m%d-%H%M%S)
BENCH_ARGS ?= --sdxl-seeds 0,1
# One thread per process: on a 2-core machine an OpenMP team that loses a core to anything else stalls.
BENCH_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1

.PHONY: venv test bench bench-train

venv: $(STAMP)

# Reinstalls only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	@touch $(STAMP)

test: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q tests

bench: venv
	@mkdir -p $(TINY)
	$(BENCH_ENV) $(VENV)/bin/sdxl-bench make-wrong-dataset --base tiny --refiner tiny --out $(TINY)/data \
	    --count 12 --steps 30 --no-progress
	test -f $(TINY)/lora/pytorch_lora_weights.safetensors || $(BENCH_ENV) $(VENV)/bin/sdxl-bench train-lora \
	    --base tiny --data $(TINY)/data --out $(TINY)/lora --max-train-steps 60 --learning-rate 1e-3 --no-progress
	$(BENCH_ENV) $(VENV)/bin/python -m pytest bench/test_quality.py -q -p no:cacheprovider \
	    --sdxl-lora wrong@v1=$(TINY)/lora --sdxl-run-id $(RUN_ID) $(BENCH_ARGS)
	@echo reports/$(RUN_ID)/report/index.html

# Seconds per LoRA training step on the tiny model (64 and 128 px) next to a plain peft loop.
bench-train: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/python bench/train_lora_overhead.py --threads 1
