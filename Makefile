# The commands of the README (demo, test, test-all). Each creates .venv from requirements.txt when it is
# missing or older than requirements.txt, requirements-crf.txt or pyproject.toml, and installs
# this repository in it (editable); nothing else needs to be typed. pydensecrf2
# (requirements-crf.txt) is optional: when it does not build, one line says so, its pip output
# stays in .venv/pydensecrf2-install.log, and the torch CRF runs instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all gpu-check venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt requirements-crf.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-crf.txt > $(VENV)/pydensecrf2-install.log 2>&1 \
		|| echo "pydensecrf2 did not install (see $(VENV)/pydensecrf2-install.log): the dense CRF runs on the torch backend (crf/densecrf.py)"
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The fast tier while working (unit tests of every module and short end-to-end runs); the whole
# suite, which CI runs, with the slowest tests listed at the end (tests/README.md: the tiers).
test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest --durations=25

# On a CUDA machine: the gpu tier, then the GPU benchmarks, within 9 minutes, results in
# gpu_check_out/RESULTS.md as they come (bench/gpu_suite.py; docs/benchmarks.md).
# GPU_CHECK_ARGS=--smoke: the same command on the CPU with the smallest sizes.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_suite $(GPU_CHECK_ARGS)

demo: $(STAMP)
	$(PY) -m protocol.demo

clean-demo:
	rm -rf demo_out
