# `make demo`: create a virtual environment (unless one is active), install, run the offline demo.
# `make test`: the same set-up, then the test suite, one worker per CPU core (pytest-xdist; a
# test file stays on one worker, so its module fixtures are built once).
#
# torch: an importable torch (CUDA or CPU) is left alone. Where none is present, TORCH_SPEC is
# installed first, so that the `torch>=2.4` dependency is already met and pip never pulls the
# CUDA wheels on a CPU-only machine. Elsewhere, e.g.:
#   make demo TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif

.PHONY: install demo test lint clean

install:
ifndef VIRTUAL_ENV
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(VENV)
endif
	@$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev,quant,fed,serve]"

demo: install
	$(PY) -m dfkd quickstart

test: install
	$(PY) -m pytest -n auto --dist loadfile

lint: install
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache src/*.egg-info
