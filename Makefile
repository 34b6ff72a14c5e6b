# sdxl-bench: `make test` and `make bench` each set up .venv first on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# What `make bench` renders: the tiny SDXL-architecture base + refiner on the CPU, in well under 2 minutes.
BENCH_ARGS ?= --base tiny --refiner tiny --size 128 --steps 20 --guidance-scale 13 --high-noise-frac 0.8 \
              --num-prompts 4 --seeds 0,1

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
	HF_HUB_OFFLINE=1 $(VENV)/bin/sdxl-bench run $(BENCH_ARGS)

# Seconds per LoRA training step on the tiny model (64 and 128 px) next to a plain peft loop.
bench-train: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/python bench/train_lora_overhead.py --threads 1
