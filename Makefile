# medseg: `make train` trains the default UNet; `make test` runs the test suite. `make help` lists all.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= unet
DATA ?= synthetic
ARGS ?=
CKPT ?=
INPUT ?=
OUTPUT ?=
RUNS ?= runs/ablation
REPORT ?= report
BUDGET ?= 00:30:00
PYTEST_ARGS ?=
CONFIGS := -c configs/default.yaml -c configs/model/$(MODEL).yaml -c configs/data/$(DATA).yaml
PIP_QUIET := --quiet --disable-pip-version-check

.DEFAULT_GOAL := help
.PHONY: help install data train auto infer cv ablation compare bench gpu-check test test-slow lint typecheck clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/pip install $(PIP_QUIET) -e ".[dev,dicom,export]"
	touch $@

install: $(VENV)/.installed ## create .venv and install medseg with its dev tools (once)

data/synthetic/classes.json: | $(VENV)/.installed
	$(BIN)/medseg data synth --output data/synthetic

data: data/synthetic/classes.json ## generate the default phantom data set in data/synthetic

train: install data ## train MODEL (configs/model/*.yaml) on DATA (configs/data/*.yaml); ARGS= adds CLI flags
	$(BIN)/medseg fit $(CONFIGS) $(ARGS)

data/synthetic_volumes/dataset.json: | $(VENV)/.installed
	$(BIN)/medseg data synth --volumes --output data/synthetic_volumes

# DATA is a task folder here (MSD or nnU-Net raw layout); the default trains on generated volumes
AUTO_DATA := $(if $(filter synthetic,$(DATA)),data/synthetic_volumes,$(DATA))
auto: install $(if $(filter synthetic,$(DATA)),data/synthetic_volumes/dataset.json) ## the best model BUDGET buys on DATA: make auto DATA=/data/Task09_Spleen BUDGET=02:00:00 (ARGS= adds flags)
	$(BIN)/medseg auto $(AUTO_DATA) --budget $(BUDGET) $(ARGS)

infer: install ## segment new scans: make infer CKPT=<run>/checkpoints/best.ckpt INPUT=scans/ OUTPUT=masks/ (ARGS= adds flags)
	@test -n "$(CKPT)" -a -n "$(INPUT)" -a -n "$(OUTPUT)" || { echo "usage: make infer CKPT=best.ckpt INPUT=scans/ OUTPUT=masks/ [ARGS=--tta]"; exit 2; }
	$(BIN)/medseg infer --checkpoint $(CKPT) --input $(INPUT) --output $(OUTPUT) $(ARGS)

cv: install data ## k-fold cross-validation of MODEL on DATA (k: --data.num_folds, default 5; resumable), out-of-fold scores, postprocessing; ARGS= adds flags
	$(BIN)/medseg cv $(CONFIGS) $(ARGS)

ablation: install data ## train the ablation suite (configs/experiment/ablation.yaml; resumable); ARGS= adds flags, e.g. --dry-run
	$(BIN)/medseg ablation $(ARGS)

compare: install ## compare the runs in RUNS (default runs/ablation): REPORT/report.md + plots
	$(BIN)/medseg compare $(RUNS) --output $(REPORT)

bench: install ## every benchmark (GPU ones on a GPU) -> benchmarks/results/<machine>-<date>.{json,md}; ARGS=--quick
	$(BIN)/python benchmarks/run_all.py $(ARGS)

# no install step: a GPU machine may be offline; the venv's python if there is one, else $(PYTHON)
gpu-check: ## the CUDA path on one GPU, <8 min -> benchmarks/results/gpu_check-<machine>-<date>.{json,md}; ARGS=--cpu: dry run
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu_check.py $(ARGS)

test: install ## run the test suite (CPU, a few minutes)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-slow: install ## run only the slow checks
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

lint: install ## check style with ruff, then types with mypy (make typecheck)
	$(BIN)/ruff check pipeline tests benchmarks notebooks
	$(BIN)/ruff format --check pipeline tests benchmarks notebooks
	$(BIN)/mypy

typecheck: install ## check the types of pipeline/ with mypy (settings: [tool.mypy] in pyproject.toml)
	$(BIN)/mypy

clean: ## remove generated data, runs and caches (keeps .venv)
	rm -rf data/synthetic runs .pytest_cache .ruff_cache .mypy_cache
