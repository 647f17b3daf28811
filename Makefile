# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and installs the package (editable) with its
# dev extra and TensorFlow. TF=gpu installs tensorflow[and-cuda] instead of
# tensorflow-cpu: `make test TF=gpu`.
PYTHON ?= python3
TF ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TF)

.PHONY: demo test bench bench-speed clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,$(TF)]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	bin/desom --dataset digits --map_size 8 8 --iterations 2000 --save_dir results/demo

test: $(STAMP)
	$(VENV)/bin/ruff check common desom dcn rswnet tests
	$(PY) -m pytest -q -n 2 --dist worksteal

bench: $(STAMP)
	bin/desom-benchmark --datasets fmnist mnist usps --models desom --runs 5 --out bench/desom --fig_dir fig
	bin/desom-benchmark --memory --iterations 2000 --out bench/memory
	bin/dcn-benchmark --dataset fmnist --runs 3 --folder --out bench/dcn
	bin/rswnet-benchmark --runs 3 --out bench/rswnet
	bin/rswnet-benchmark --heads som --runs 3 --out bench/rswnet_som
	bin/ae-benchmark --runs 3 --out bench/ae
	bin/selflabel-benchmark --runs 3 --jobs 3 --iterations 3 --out bench/selflabel

# ms per training step of every model in our loop and in a bare Keras step (a few minutes)
bench-speed: $(STAMP)
	bin/desom-benchmark --speed --out bench/speed
	bin/dcn-benchmark --speed --out bench/speed

clean:
	rm -rf $(VENV) results bench .pytest_cache
