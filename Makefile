# The two quickstart commands: `make demo` and `make test` (`make test-fast`: the quick tier). All create .venv when absent.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CPU_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8
WORKDIR ?= runs/mae_digits

.PHONY: demo test test-fast install clean

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,interop]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/maskjax train --config configs/mae_digits.py --workdir $(WORKDIR)

test: $(STAMP)
	$(CPU_ENV) $(PY) -m pytest -x -q -n 2 tests

# Unit and property tests only (no subprocess, dataset or training run): the loop while editing.
test-fast: $(STAMP)
	$(CPU_ENV) $(PY) -m pytest -x -q -n 2 -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
