# `make demo`: set up .venv with the package's own dependencies if missing, then train the tiny
# CoLA demo on CPU. `make test`: add the test extras (dev, and parity and beam on 3.11) if missing,
# then run the whole test suite. Each install has its own stamp, so `make demo` then `make test` (or
# the other way round) on one .venv installs what the second one needs.
# PYTHON=python3.12 VENV=.venv312 make test runs the suite on another Python; PYTEST_ARGS='-m "not slow"'
# leaves out the multi-process tests (CI does on Python 3.12).
PYTHON ?= python3
VENV ?= .venv
PYVER := $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
CONSTRAINTS := constraints/py$(PYVER).txt
STAMP := $(VENV)/.installed-$(PYVER)
DEMO_STAMP := $(VENV)/.installed-$(PYVER)-base
# The parity extra (the authors' PyTorch code) installs as a CPU build on Python 3.11 only; the
# beam extra (apache-beam 2.77 needs numpy<2.5, 3.12's verified numpy is 2.5) too. The tpu extra
# (libtpu, for the TPU-compile tests) installs on both.
COMMA := ,
EXTRAS := dev$(COMMA)tpu$(if $(filter 311,$(PYVER)),$(COMMA)parity$(COMMA)beam)

.PHONY: demo test venv lock

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

INSTALL = $(VENV)/bin/python -m pip install -q $(if $(wildcard $(CONSTRAINTS)),-c $(CONSTRAINTS)) -e

# The test venv: the package with the test extras.
$(STAMP): pyproject.toml $(wildcard $(CONSTRAINTS)) | $(VENV)/bin/python
	$(INSTALL) ".[$(EXTRAS)]"
	touch $@

# The demo's: the package's own dependencies only (a test venv has them too).
$(DEMO_STAMP): pyproject.toml $(wildcard $(CONSTRAINTS)) | $(VENV)/bin/python
	$(INSTALL) .
	touch $@

demo: $(DEMO_STAMP)
	$(VENV)/bin/python train.py --config configs/tiny.py --workdir runs/tiny

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --durations=25 $(PYTEST_ARGS) tests

# Record the versions of the current venv as the verified set for this Python.
lock: $(STAMP)
	{ echo "# Versions CI verified on Python $(PYVER) (pip freeze of the test venv); regenerate with \`make lock\`."; \
	  $(VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^colax'; } > $(CONSTRAINTS)
