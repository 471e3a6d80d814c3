# Set-up and entry points. Every target creates .venv and installs what it needs on a fresh
# machine from the committed lock of exact versions (requirements.lock): torch first
# (TORCH_SPEC, the CPU build on these machines), then the build backend, then the project.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the Triton that the CUDA build of TORCH_SPEC pins, so the AOT test compiles what GPU users get
TRITON_SPEC ?= triton==3.7.1
PIP_SPEC   ?= pip==26.3
LOCK       ?= requirements.lock
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make test-latest: the same suite against the newest releases, in a venv of its own
LATEST_VENV ?= .venv-latest
# make lock: pip-tools in a venv of its own (its pip resolver sees the CPU torch build here)
LOCK_VENV  ?= .venv-lock
LOCK_TOOLS ?= pip==26.3 pip-tools==7.7.0

.PHONY: test test-latest bench bench-full gpu-check install-dev install-bench lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(PIP_SPEC)"

# One stamp per extra; re-installs when pyproject.toml or the lock changes. The project is
# built without build isolation so that setuptools, too, comes from the lock.
$(VENV)/.installed-%: pyproject.toml $(LOCK) | $(PY)
	$(PIP) install --quiet -c $(LOCK) "$(TORCH_SPEC)" setuptools
	$(PIP) install --quiet -c $(LOCK) --no-build-isolation -e ".[$*]"
	touch $@

install-dev: $(VENV)/.installed-dev
install-bench: $(VENV)/.installed-bench

## make test: the whole test suite (Triton kernels run in the interpreter on CPU)
test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

## make test-latest: the whole test suite against the newest releases (not CI; torch stays TORCH_SPEC)
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

## make lock: re-resolve requirements.lock from pyproject.toml (every extra CI and bench use)
lock:
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet $(LOCK_TOOLS)
	printf "%s\n%s\n" "$(TORCH_SPEC)" "$(TRITON_SPEC)" > $(LOCK_VENV)/torch.in
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --strip-extras --allow-unsafe \
	    --no-emit-index-url --no-emit-find-links --annotation-style=line --extra dev --extra bench \
	    --output-file $(LOCK) pyproject.toml $(LOCK_VENV)/torch.in
	# one pin for the CPU (+cpu) and the CUDA build; the project itself and local paths left out
	sed -i -e 's/^torch==\([0-9.]*\)+cpu/torch==\1/' -e '/^aa-compile @/d' \
	    -e 's|$(CURDIR)/||g' $(LOCK)

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
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) build dist *.egg-info .pytest_cache .hypothesis .benchmarks
