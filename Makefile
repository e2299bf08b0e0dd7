# geoloc_ray: `make demo` runs the whole pipeline on the embedded default; `make test` passes the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
PIP := $(BIN)/pip install -q
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test lint e2e bench clean

# `make demo` needs the package and its CPU extra; tests and benchmarks add the dev tools.
$(RUN_STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PIP) -e '.[cpu]'
	@touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(PIP) -e '.[cpu,dev]'
	@touch $(DEV_STAMP)

venv: $(RUN_STAMP)

demo: $(RUN_STAMP)
	$(BIN)/geoloc-ray demo

test: $(DEV_STAMP)
	$(BIN)/ruff check geoloc_ray tests jobs bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

e2e: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests/test_e2e_job.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check geoloc_ray tests jobs bench
	$(BIN)/lint-imports

bench: $(DEV_STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf artifacts data .pytest_cache
