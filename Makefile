# splitspec: `make install` then `make test`. Everything runs from the virtual environment in .venv.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install proto test test-slow test-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml proto/splitspec/v1/*.proto
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: an open range would pull the newest build. TORCH_INDEX picks the index it comes from
	# (https://download.pytorch.org/whl/cpu for the CPU-only build; PyPI's Linux wheel is the CUDA one).
	$(PIP) install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet "grpcio-tools>=1.70,<2"
	$(MAKE) proto
	$(PIP) install --quiet -e ./client -e ".[dev,bench]"
	touch $@

proto:
	$(PY) proto/generate.py

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# On a machine with a CUDA device: the target on the GPU, the draft on the CPU (skipped where there is none).
test-gpu: install
	$(PY) -m pytest -q -m gpu

# The demo pair is built on first use (~/.cache/splitspec/demo-models). DEMO_ARGS/BENCH_ARGS: e.g. BENCH_ARGS=--quick
.PHONY: demo bench
demo: install
	$(PY) -m splitspec.demo $(DEMO_ARGS)

bench: install
	$(PY) -m splitspec.bench $(BENCH_ARGS)

clean:
	rm -rf client/splitspec_client/v1 build dist *.egg-info client/*.egg-info .pytest_cache
