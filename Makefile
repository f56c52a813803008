# Two Quickstart commands: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench study clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: these wheels lie on the build machines' disk (no multi-GB download).
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev,cluster,bench,s3]'
	@touch $(STAMP)

# Fine-tunes the shipped base model (gcl/assets/gcl-base-world) on the fashion catalog; ends with a before/after table.
demo: $(STAMP)
	$(BIN)/python train.py experiment=demo

test: $(STAMP)
	$(BIN)/python -m ruff check gcl tests benchmarks train.py evaluate.py
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_loss_step.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_train_vs_openclip.py

study: $(STAMP)
	$(BIN)/python benchmarks/study_multifield.py

clean-venv:
	rm -rf $(VENV)
