# Two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# Test processes (pytest-xdist): two halve the wall time of the compile-bound suite on a 2-core machine.
PYTEST_WORKERS ?= 2

.PHONY: run test lint test-slow test-all test-properties mutate mutate-sample bench verify examples clean clean-runs

## The main job: train the default model (configs/spiral.toml, the book's chapter 11) into runs/spiral.
## A second `make run` continues an interrupted run (--resume), and on a finished one says it is complete and
## changes nothing; `make clean-runs` starts over.
run: $(VENV)/.installed-run
	@if [ -f runs/spiral/checkpoint.npz ]; then $(BIN)/funcgrad train --resume; else $(BIN)/funcgrad train; fi

## The default test suite (about 5 minutes on 2 cores): the conventions (lint, types), then the tests and every
## docstring example; slow tests are skipped (make test-slow).
test: lint $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow" -n $(PYTEST_WORKERS) --doctest-modules funcgrad tests $(PYTEST_ARGS)

## The conventions: ruff's rule set and mypy, both configured in pyproject.toml.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

## Slow tests: book-length training runs, multi-process and kill/resume runs, the full `funcgrad verify`, and the
## default suite's longest tests (each rule's three-way check, the README's blocks, the CLI's runs). CI runs them
## after `make test` (.ci/run).
test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m slow -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-all: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Mutation testing of the modules in [tool.mutmut] (pyproject.toml): hours on 2 cores, so never in CI.
## `make mutate MUTANTS="funcgrad.optim*"` narrows it to one module; `.venv/bin/mutmut results` lists survivors.
MUTANTS ?=
mutate: $(VENV)/.installed-dev
	$(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

## The sampled run whose scores tests/MUTATION.md reports: MUTANTS_PER_MODULE mutants drawn per module with a
## fixed seed (tests/mutation_sample.py). `mutmut run` generates the mutants first when mutants/ is missing.
MUTANTS_PER_MODULE ?= 20
mutate-sample: $(VENV)/.installed-dev
	@[ -d mutants ] || $(BIN)/mutmut run "funcgrad.checkpoint.x__check_finite__mutmut_1"
	$(BIN)/mutmut run $$($(BIN)/python tests/mutation_sample.py $(MUTANTS_PER_MODULE))
	$(BIN)/python tests/mutation_sample.py $(MUTANTS_PER_MODULE) --report

## Property-based tests with many more random examples than the default suite's derandomized 25.
test-properties: $(VENV)/.installed-dev
	HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -p no:cacheprovider tests/test_properties.py $(PYTEST_ARGS)

## Gradient cross-checks of the whole catalog of hand-derived rules.
verify: $(VENV)/.installed-run
	$(BIN)/funcgrad verify

## Run every script in examples/.
examples: $(VENV)/.installed-run
	@set -e; for f in examples/*.py; do echo "== $$f"; $(BIN)/python $$f; done

## Benchmarks (see benchmarks/README.md).
bench: $(VENV)/.installed-dev
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "funcgrad needs Python >= 3.11; run e.g. make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@ $(VENV)/.installed-run

clean-runs:
	rm -rf runs

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
