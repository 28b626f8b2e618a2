# peftlab: the two commands are `make book` and `make test` (see README.md).
#
#   make book                       set up, run every chapter, build _build/html
#   make test                       set up, unit tests, every chapter in the smoke profile (with
#                                   its GPU section simulated), strict build, offline checks
#   make chapter NB=book/lab.ipynb  run one chapter (PEFTLAB_PROFILE picks its size)
#   make setup                      only create/update .venv and fetch the book's JavaScript
#   make strip                      strip outputs from book/**/*.ipynb before committing
#   make clean                      remove _build and the executed copy
#
# Knobs: PEFTLAB_PROFILE=smoke|cpu|gpu (default: gpu with CUDA, else cpu) for `book` and
# `chapter`; JOBS (parallel notebooks/test workers, default 2); THREADS (torch/BLAS threads
# per worker, default 1); PYTHON (interpreter that creates .venv, default python3.11).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
PY      := $(VENV)/bin/python
JOBS    ?= 2
THREADS ?= 1
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.peftlab-installed
JS      := _vendor/.fetched.json
EXEC    := .cache/book-exec
REPORTS := _build/reports
NB_TIMEOUT ?= 600
# make test's smoke chapters: their slowest cell takes ~30 s; a wait that stalls anyway costs at most this, not
# NB_TIMEOUT (the stall seen, a missed zmq wake-up lasting a whole cell timeout, tools/nbclient_wakeup.py cuts)
SMOKE_NB_TIMEOUT ?= 180
# a unit test past this many seconds fails with every thread's stack (a hang never eats CI's limit)
UNIT_TIMEOUT ?= 600

# Every process gets THREADS threads: JOBS workers x THREADS must fit the machine.
export OMP_NUM_THREADS := $(THREADS)
export MKL_NUM_THREADS := $(THREADS)
export OPENBLAS_NUM_THREADS := $(THREADS)
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1

# smoke and cpu never touch the network (peftlab.lab.profile also sets this at import): the hub
# libraries go offline, so nothing waits on a network timeout. gpu (Colab) downloads real models.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ifneq ($(filter smoke cpu,$(PEFTLAB_PROFILE)),)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
endif

.PHONY: help setup book test chapter strip clean unit notebooks html check

help:
	@sed -n '2,13p' Makefile | sed 's/^# \{0,1\}//'

# ---------------------------------------------------------------- set-up (shared)
setup: $(STAMP) $(JS)

# torch first, from the pinned CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

# MathJax and the ipywidgets manager from the npm registry (never committed), see tools/.
$(JS): tools/fetch_js.py | $(STAMP)
	$(PY) tools/fetch_js.py
	@touch $@

# ---------------------------------------------------------------- the book
# Execute every chapter once (nbmake, in a scratch copy so sources stay stripped), then
# render that copy with execution off: outputs, glue values and widget state come from
# the one run.
book: setup
	$(MAKE) --no-print-directory notebooks
	$(MAKE) --no-print-directory html
	@echo "book: open _build/html/index.html"

notebooks:
	@mkdir -p $(REPORTS)
	$(PY) tools/prepare_exec.py $(EXEC)
	$(PY) -m pytest $(EXEC)/book --nbmake --overwrite --nbmake-timeout=$(NB_TIMEOUT) \
	    -n $(JOBS) -p no:cacheprovider -p tools.nbmake_ports -p tools.nbclient_wakeup -o addopts="" \
	    --reruns 1 --only-rerun "Kernel died|DeadKernel|[Tt]imeout|timed out" \
	    --junitxml=$(REPORTS)/notebooks.xml

# --all: every page is written again; sphinxcontrib-bibtex numbers its citation links across pages, and
# an incremental build leaves unchanged pages (book/bibliography.md) with stale labels and entries.
html:
	$(VENV)/bin/jupyter-book build $(EXEC) --path-output . --all $(STRICT)

# ---------------------------------------------------------------- tests
test: setup
	$(MAKE) --no-print-directory unit
	PEFTLAB_PROFILE=smoke PEFTLAB_GPU_SIM=1 $(OFFLINE) \
	    $(MAKE) --no-print-directory notebooks NB_TIMEOUT=$(SMOKE_NB_TIMEOUT)
	$(MAKE) --no-print-directory html STRICT="-W --keep-going"
	$(MAKE) --no-print-directory check
	@$(PY) tools/test_summary.py $(REPORTS)/unit.xml $(REPORTS)/notebooks.xml

unit:
	@mkdir -p $(REPORTS)
	MPLBACKEND=Agg $(OFFLINE) \
	    $(PY) -m pytest tests -n $(JOBS) -p no:cacheprovider --junitxml=$(REPORTS)/unit.xml \
	        --timeout=$(UNIT_TIMEOUT) --timeout-method=thread --durations=15

check:
	$(PY) tools/check_build.py --html _build/html

# ---------------------------------------------------------------- helpers
chapter: setup
	@test -n "$(NB)" || { echo "usage: make chapter NB=book/<chapter>.ipynb"; exit 2; }
	$(PY) -m pytest "$(NB)" --nbmake --nbmake-timeout=$(NB_TIMEOUT) -p no:cacheprovider -p tools.nbclient_wakeup -v

strip:
	$(PY) tools/strip_notebooks.py

clean:
	rm -rf _build $(EXEC)

# ---------------------------------------------------------------- benchmarks (not part of `make test`)
# peftlab against peft, interleaved; writes benchmarks/results/latest.{json,png} and book/benchmarks.md.
.PHONY: bench
bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/report.py
