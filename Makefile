# Set-up and the two commands of the README. Everything installs into .venv from the package registry.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-quick pretrain clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel first: a looser spec would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/persguard demo --out runs/demo

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q -ra

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Rebuild the committed models from scratch (see README: about 40 minutes on 2 cores).
pretrain: $(STAMP)
	$(BIN)/persguard pretrain --config configs/pretrain.yaml --out models
	$(BIN)/persguard pretrain --evaluators --out models

clean:
	rm -rf runs .pytest_cache
