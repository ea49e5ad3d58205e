# blip2_train: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev extra (when needed)

demo: $(STAMP) ## train the embedded default: tiny EVA + Q-Former on synthetic shards, CPU, a few minutes
	$(PY) -m blip2_train $(ARGS)

test: $(STAMP) ## run the default test suite (not the slow tests)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest $(PYTEST_ARGS)

wheel-check: $(STAMP) ## build the wheel, install it (not editable) in a fresh venv, train 5 steps elsewhere
	.ci/wheel-check $(PY)

lint: $(STAMP) ## ruff
	$(PY) -m ruff check blip2_train tests data_recipes

bench: $(STAMP) ## benchmark the training step and the loader; writes bench.json
	$(PY) -m blip2_train.bench

bench-gpu: $(STAMP) ## on a GPU: stage 1 from images through the frozen EVA ViT-g (MFU), ours and LAVIS's; writes bench_gpu.json
	$(PY) -m blip2_train.bench --encoder eva --impl fast,lavis --batch-sizes 128,64,256 --sweep-steps 5 \
		--no-stage2 --no-loader --output bench_gpu.json $(ARGS)

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf runs outputs multirun .pytest_cache .ruff_cache

.PHONY: help install demo test test-all wheel-check lint bench bench-gpu clean
