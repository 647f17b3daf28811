# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and installs the package (editable) with its
# dev extra and TensorFlow. TF=gpu installs tensorflow[and-cuda] instead of
# tensorflow-cpu: `make test TF=gpu`; switching removes the other flavour first
# and checks that exactly one is installed.
PYTHON ?= python3
TF ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TF)

.PHONY: demo test test-fast bench bench-robust bench-speed gpu-check bench-schedule bench-deckeras bench-deckeras-reference bench-desom30k clean

# the other flavour's distribution: both install the module `tensorflow`, so it goes first
OTHER_TF := $(if $(filter gpu,$(TF)),tensorflow-cpu,tensorflow)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes $(OTHER_TF) 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev,$(TF)]'
	@n=$$($(PY) -m pip list 2>/dev/null | grep -ciE '^tensorflow([-_]cpu)? '); test "$$n" = 1 || \
	  { echo "expected one TensorFlow flavour in $(VENV), found $$n:"; $(PY) -m pip list | grep -iE '^tensorflow'; exit 1; }
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	bin/desom --dataset digits --map_size 8 8 --iterations 2000 --save_dir results/demo

test: $(STAMP)
	$(VENV)/bin/ruff check common desom dcn rswnet tests
	$(PY) -m pytest -q -n 2 --dist worksteal

# the edit-test lane: everything but the tests marked slow (subprocesses, trained scenarios)
test-fast: $(STAMP)
	$(VENV)/bin/ruff check common desom dcn rswnet tests
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

bench: $(STAMP)
	bin/desom-benchmark --datasets fmnist mnist usps --models desom --runs 5 --save_dir bench/desom --fig_dir fig
	bin/desom-benchmark --memory --iterations 2000 --save_dir bench/memory
	bin/desom-benchmark --explorer --save_dir bench/explorer
	bin/dcn-benchmark --dataset fmnist --runs 3 --folder --save_dir bench/dcn
	bin/rswnet-benchmark --runs 3 --desom_iterations 10000 --save_dir bench/rswnet
	bin/rswnet-benchmark --heads som --runs 3 --desom_iterations 10000 --save_dir bench/rswnet_som
	bin/ae-benchmark --runs 3 --save_dir bench/ae
	bin/selflabel-benchmark --runs 5 --jobs 2 --rounds 3 --save_dir bench/selflabel_full

# every training program with its defaults on data sets nobody tuned for, against k-means and UMAP + GMM on
# the raw inputs (several hours; cells that finished are read back: stop and run it on at will)
bench-robust: $(STAMP)
	bin/robustness-benchmark --save_dir bench/robust

# the end of DESOM's temperature schedule against map organisation (one seed; about an hour)
bench-schedule: $(STAMP)
	for t in 0.1 0.3 0.5 0.6 0.7 1.0; do bin/desom --dataset fmnist --map_size 8 8 --Tmin $$t --seed 0 \
	  --verbose 0 --save_dir bench/schedule/8x8_tmin$$t; done
	bin/desom --dataset fmnist --map_size 8 8 --Tmin 1.0 --som_iterations 5000 --seed 0 --verbose 0 \
	  --save_dir bench/schedule/8x8_tmin1.0_hold
	for t in 0.1 0.3 0.7 1.0; do bin/desom --dataset fmnist --map_size 20 20 --Tmin $$t --seed 0 \
	  --verbose 0 --save_dir bench/schedule/20x20_tmin$$t; done

# DEC, IDEC and AE + k-means with DEC-keras' protocol (300 epochs of pretraining), 5 seeds two at a time,
# each on one core (1.8-2.0 hours a seed here, so about 6 hours; seeds already finished in bench/deckeras
# are read back, not run again)
bench-deckeras: $(STAMP)
	bin/dcn-benchmark --dataset fmnist --protocol dec-keras --runs 5 --jobs 2 --save_dir bench/deckeras

# DEC-keras itself (its DEC.py on tf_keras, installed beside the venv, not into it), seeds 0 and 1 on cores
# 0 and 1 (77 minutes of pretraining, then up to 20,000 iterations; each process grew to 8.9 GB here), then
# our DEC from each of its pretrained autoencoders. Needs a DEC-keras checkout:
# make bench-deckeras-reference DECKERAS=path/to/DEC-keras
DECKERAS ?= ../DEC-keras
TF_KERAS := $(VENV)/tf_keras
bench-deckeras-reference: $(STAMP)
	test -d $(TF_KERAS) || $(PY) -m pip install --quiet --no-deps --target $(TF_KERAS) \
	  "tf_keras~=$$($(PY) -c 'import tensorflow as tf; print(*tf.__version__.split(".")[:2], sep=".")').0"
	mkdir -p bench/deckeras_reference
	pids=; for s in 0 1; do PYTHONPATH=$(TF_KERAS) TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \
	  OMP_NUM_THREADS=1 taskset -c $$s bin/dcn-deckeras --deckeras $(DECKERAS) --seed $$s \
	  --save_dir bench/deckeras_reference > bench/deckeras_reference/log_seed$$s.txt 2>&1 & pids="$$pids $$!"; done; \
	  for p in $$pids; do wait $$p || { kill $$pids 2>/dev/null; tail -3 bench/deckeras_reference/log_seed*.txt; \
	  exit 1; }; done
	bin/dcn-benchmark --dataset fmnist --protocol dec-keras --methods ae+kmeans dec --runs 2 --jobs 2 \
	  --pretrained bench/deckeras_reference --save_dir bench/deckeras_reference/ours

# DESOM on Fashion-MNIST 8x8 with 30,000 iterations of the paper's schedule (our best purity), 5 seeds two at
# a time, each on one core (about 30 minutes a seed here; seeds finished in bench/it30k are read back)
bench-desom30k: $(STAMP)
	bin/desom-benchmark --datasets fmnist --models desom --iterations 30000 --runs 5 --jobs 2 --save_dir bench/it30k

# ms per training step of every model in our loop and in a bare Keras step (a few minutes)
bench-speed: $(STAMP)
	bin/desom-benchmark --speed --save_dir bench/speed
	bin/dcn-benchmark --speed --save_dir bench/speed

# a GPU machine in one run (make gpu-check TF=gpu): devices and versions, every model's step in float32 and
# mixed precision, DESOM on Fashion-MNIST (the paper's 10,000 iterations) and every program under the
# default and mirrored strategies (under 8 minutes on a GPU; without one, CPU sizes in a few minutes)
gpu-check: $(STAMP)
	bin/gpu-check --save_dir bench/gpu-check

clean:
	rm -rf $(VENV) results bench .pytest_cache
