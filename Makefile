# geoloc_ray: `make demo` runs the whole pipeline on the embedded default; `make test` passes the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test lint e2e bench clean

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/geoloc-ray demo

test: $(STAMP)
	$(BIN)/ruff check geoloc_ray tests jobs bench
	$(BIN)/python -m pytest -q

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_e2e_job.py

lint: $(STAMP)
	$(BIN)/ruff check geoloc_ray tests jobs bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf artifacts data .pytest_cache
