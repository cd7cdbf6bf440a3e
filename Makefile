# churn: `make run` runs the pipeline on the bundled data, `make test` runs the tests.
# Both create .venv and install the locked dependencies first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/$(VENV)
export UV_COMPILE_BYTECODE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.DEFAULT_GOAL := help
.PHONY: help install install-spark run test lint check clean screenshot bench

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv>=0.9"
	$(BIN)/uv sync --frozen --inexact
	touch $@

install: $(VENV)/.installed ## Create .venv with the locked dependencies (incl. dev tools)

$(VENV)/.installed-spark: $(VENV)/.installed
	$(BIN)/uv sync --frozen --inexact --extra spark
	touch $@

install-spark: $(VENV)/.installed-spark ## Add PySpark (the spark extra) for engine: spark; needs Java 17

run: install ## Run the whole pipeline (dvc repro) on the data named in params.yaml
	dvc repro

test: install ## Run the test suite (a module per worker, up to 4 workers)
	pytest --numprocesses auto --maxprocesses 4 --dist loadscope

bench: install ## Benchmark 1M and 10M synthetic rows into reports/bench.json (BENCH_ARGS=--100m)
	python -m benchmarks.run $(BENCH_ARGS)

screenshot: ## Render reports/retention_report.html to a PNG (needs Debian's chromium)
	chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
	  --disable-component-update --no-first-run --user-data-dir=$$(mktemp -d) \
	  --window-size=1280,2400 --screenshot=$(CURDIR)/reports/retention_report.png \
	  file://$(CURDIR)/reports/retention_report.html

lint: install ## ruff lint and format check
	ruff check src tests benchmarks notebooks
	ruff format --check src tests benchmarks notebooks

check: lint test ## Everything CI runs

clean: ## Remove generated data, models and reports (keeps .venv and mlflow.db)
	rm -rf data/interim data/features data/scored models/churn_model models/model_info.json reports
