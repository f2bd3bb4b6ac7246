# r2m_lab — every target installs what it needs first (a fresh machine has nothing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Offline by default: no hub downloads, no albumentations update check. W&B is offline by the config
# (logger.offline=true), not by WANDB_MODE: the variable would beat logger.offline=false (see stages/loggers.py).
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1

.PHONY: install demo test test-fast lint format bench bench-merge bench-train tables clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Install, then run the whole method on the embedded synthetic benchmark (CPU, a few minutes).
demo: install
	$(BIN)/python -m r2m_lab

## The full test suite, slow real-CLI tests included (this is what CI runs). The tests run single-threaded
## (tests/conftest.py), so pytest-xdist spreads them over the cores, the longest first, an idle worker taking
## queued tests from a busy one (worksteal): TEST_WORKERS=1 runs them in one process.
TEST_WORKERS ?= auto
test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

## Skip the slow real-CLI tests (local iteration only; CI always runs them).
test-fast: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

## Benchmarks (not tests): merge wall time and peak RSS at real CLIP ViT-B/16 and ViT-L/14 shapes, N = 3 and 6.
## Writes bench/merge_report.{md,json}; the first run writes ~10 GB of random-weight fixtures under bench/fixtures.
bench: bench-merge

bench-merge: install
	$(BIN)/python -m r2m_lab.bench $(BENCH_ARGS)

## Training throughput (images/s): the model alone, the data pipeline alone (PNG decode + augment) and both together;
## tiny on CPU, plus CLIP ViT-B/16 and ViT-L/14 (224 px, bf16, batch 32) on a GPU. Writes bench/train_report.{md,json}.
##   make bench-train [BENCH_TRAIN_ARGS="--workers 12 --steps 50"]
bench-train: install
	$(BIN)/python -m r2m_lab.bench_train $(BENCH_TRAIN_ARGS)

# Each folder quoted: job folders hold "=" and "," (0_seed=1,merger=average), which Hydra's list syntax would split.
_comma := ,
_space := $(subst ,, )
RUNS_LIST = $(subst $(_space),$(_comma),$(foreach r,$(RUNS),"$(r)"))

## The paper's tables (Markdown, CSV, LaTeX, plots, bootstrap intervals) from sweep and/or run folders:
##   make tables RUNS="multirun/2026-12-03/12-00-00 multirun/2026-12-03/13-00-00" [TABLES_ARGS="stage.bootstrap=2000"]
tables: install
	@test -n "$(RUNS)" || { echo 'make tables needs RUNS="<sweep or run folder> ..."' >&2; exit 2; }
	$(BIN)/python -m r2m_lab stage=tables 'stage.runs=[$(RUNS_LIST)]' $(TABLES_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf outputs multirun wandb .pytest_cache .ruff_cache
