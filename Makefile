# Two targets a newcomer needs: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit test-property chaos bench lint format stack-up stack-status stack-down clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ is required (found: $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(STAMP)

## The main job: bring the stack up (installing it on first run) and run the demo.
demo: $(STAMP)
	$(BIN)/accord demo run

## The whole suite: unit tests, then integration and end-to-end tests on the real stack.
test: $(STAMP)
	$(BIN)/python -m pytest

## Benchmarks, each beside its ceiling in the same run; figures and a plot in bench/results/.
## The pipeline bench brings the stack up, runs 100,000 customers' events through the
## ceiling, the Quix Streams peer and 1 and 2 Accord workers, then the latency ladder and
## the 1M-state recovery (about 30 minutes in all).
bench: $(STAMP)
	$(BIN)/python bench/codec_bench.py
	$(BIN)/python bench/stages_bench.py
	$(BIN)/python bench/pipeline_bench.py

## The fault suite: crashes, outages and poison under load, judged by an oracle. Prints
## a table; figures in .accord/reports/chaos.json. A subset: `make chaos K=redis` (pytest -k).
K ?=
chaos: $(STAMP)
	$(BIN)/python -m pytest -m chaos tests/chaos --timeout 1200 $(if $(K),-k "$(K)")

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

## The merge's properties with 10,000 examples each (the default run uses 200).
test-property: $(STAMP)
	$(BIN)/python -m pytest -m property --hypothesis-profile=thorough tests/unit

lint: $(STAMP)
	$(BIN)/ruff check streams tests
	$(BIN)/ruff format --check streams tests

format: $(STAMP)
	$(BIN)/ruff format streams tests
	$(BIN)/ruff check --fix streams tests

stack-up: $(STAMP)
	$(BIN)/accord stack up

stack-status: $(STAMP)
	$(BIN)/accord stack status

stack-down: $(STAMP)
	$(BIN)/accord stack down

clean: stack-down
	rm -rf .accord
