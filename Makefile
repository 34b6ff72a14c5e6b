# sdxl-bench: `make test` and `make bench` each set up .venv first on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# `make bench` is the whole experiment on the embedded toy world, offline, on the CPU: the toy SDXL's own
# "wrong" images (degraded), a LoRA trained on them, the three variants over held-out toy prompts and two seeds,
# scored with the oracle, the toy CLIP, FID/KID/CMMD and paired statistics, and the report.
# The dataset, reference and LoRA are reused between runs, in a folder named after the toy weights' content
# (sdxl_core.presets.toy_fingerprint, which make-wrong-dataset records too; $SDXL_BENCH_TOY_WEIGHTS is honoured),
# so that after `make train-toy` they are made again from the new weights. Computed once the venv exists.
TOY_ID = $(shell $(VENV)/bin/python -c 'from sdxl_core.presets import toy_fingerprint; print(toy_fingerprint())')
RUN_ID ?= bench-$(shell date +%Y%m%d-%H%M%S)
BENCH_ARGS ?= --sdxl-seeds 0,1
# One thread per process: on a 2-core machine an OpenMP team that loses a core to anything else stalls.
BENCH_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1

.PHONY: venv test bench bench-train train-toy

venv: $(STAMP)

# Reinstalls only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	@touch $(STAMP)

test: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q tests

bench: venv
	$(eval TOY := reports/toy-wrong-$(TOY_ID))
	@test $(TOY) != reports/toy-wrong- || { echo "make bench: no toy weights fingerprint (the error above)"; exit 2; }
	@mkdir -p $(TOY)
	$(BENCH_ENV) $(VENV)/bin/sdxl-bench make-wrong-dataset --base toy --refiner toy --out $(TOY)/data \
	    --count 24 --steps 25 --degrade blur,jpeg,noise,colour-shift,cutout --no-progress
	test -f $(TOY)/reference/metadata.jsonl || $(VENV)/bin/sdxl-bench toy-dataset --out $(TOY)/reference --n 300
	test -f $(TOY)/lora/pytorch_lora_weights.safetensors || $(BENCH_ENV) $(VENV)/bin/sdxl-bench train-lora \
	    --base toy --data $(TOY)/data --out $(TOY)/lora --max-train-steps 100 --learning-rate 1e-3 --no-progress
	$(BENCH_ENV) $(VENV)/bin/python -m pytest bench/test_quality.py -q -p no:cacheprovider --sdxl-base toy \
	    --sdxl-lora wrong@v1=$(TOY)/lora --sdxl-reference $(TOY)/reference --sdxl-run-id $(RUN_ID) $(BENCH_ARGS)
	@echo reports/$(RUN_ID)/report/index.html

# Retrains the toy world's VAE, base, refiner and CLIP from scratch (seeded; the committed weights: 50 min on 2 idle cores) into
# sdxl_core/toy/weights, with loss curves, provenance and the evaluation in training.json. Resumes by stage.
train-toy: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 $(VENV)/bin/sdxl-bench train-toy

# Seconds per LoRA training step on the tiny model (64 and 128 px) next to a plain peft loop.
bench-train: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/python bench/train_lora_overhead.py --threads 1
