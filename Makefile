# Set-up and entry points. Every target creates .venv and installs what it needs on a fresh
# machine: torch first (TORCH_SPEC, the CPU build on these machines), then the project.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench bench-full gpu-check install-dev install-bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One stamp per extra; re-installs when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[$*]"
	touch $@

install-dev: $(VENV)/.installed-dev
install-bench: $(VENV)/.installed-bench

## make test: the whole test suite (Triton kernels run in the interpreter on CPU)
test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

## make bench: the benchmark harness, quick set, on this machine's CPU (or GPU)
bench: install-bench
	$(PY) -m bench --quick $(BENCH_ARGS)

## make bench-full: every workload at full size
bench-full: install-bench
	$(PY) -m bench $(BENCH_ARGS)

## make gpu-check OUT=dir: CUDA tests + harness on a GPU machine (see docs/gpu.md)
gpu-check:
	bash bench/gpu_check.sh $(or $(OUT),gpu-results)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .benchmarks
