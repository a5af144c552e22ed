# rlsynth: `make run` runs the main job, `make test` runs the test suite; both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch pin in pyproject.toml takes the local CPU wheel on the dev/CI machines; an open range would
# pull a multi-GB CUDA build.
PIP_FLAGS ?= --disable-pip-version-check --progress-bar off

.PHONY: venv run tour test lint typecheck check bench-io clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -q -e '.[dev]'
	@touch $(STAMP)

# The whole pipeline on a local Ray cluster: configs/quickstart.yaml (catalog and runs under out/).
run: venv
	RLSYNTH_CATALOG=$${RLSYNTH_CATALOG:-out/catalog} $(BIN)/rlsynth run configs/quickstart.yaml --runs out/runs

# The I/O tour: recipe, HDF5 and Minari round trips, verify, d3rlpy BC, fidelity, world model.
tour: venv
	$(BIN)/python -m rlsynth.pipeline.quickstart

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

check: lint typecheck test

bench-io: venv
	$(BIN)/python bench/io.py --transitions 1000000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
