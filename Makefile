# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and installs the package (editable) with its
# dev extra and TensorFlow. TF=gpu installs tensorflow[and-cuda] instead of
# tensorflow-cpu: `make test TF=gpu`.
PYTHON ?= python3
TF ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TF)

.PHONY: demo test clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,$(TF)]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) -m common.data info digits

test: $(STAMP)
	$(VENV)/bin/ruff check common desom dcn rswnet tests
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) results bench .pytest_cache
