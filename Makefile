# make demo   set up .venv, then run the quickstart on this machine's default backends
# make test   set up .venv, then run the test suite (GPU tests skip without a GPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test cutlass-build-check gpu-check bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# reuse a torch that is already installed; otherwise take the pinned CPU build
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test,triton]"
	@# FlashInfer, for its selection and error tests: the package and what `import flashinfer`
	@# needs (the full extra also pulls the cuDNN frontend and CUTLASS DSL, which only GPUs use)
	$(PY) -m pip install -q --no-deps "flashinfer-python==0.7.2"
	$(PY) -m pip install -q "apache-tvm-ffi>=0.1.11,<0.2" nvidia-ml-py requests tqdm
	@# CUTLASS headers for the compile check of the CUTLASS kernels (its Python deps are for its
	@# own generator, which we do not use)
	$(PY) -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0" ninja
	@touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

# nvcc compiles every CUTLASS source for sm_90a (no GPU needed; `make test` runs it too when nvcc is there)
cutlass-build-check: $(VENV)/.installed
	$(PY) -m qlinear_pass.kernels.cutlass_build --compile-only

# on a CUDA machine: every GPU test, then the benchmark; results under $$OUT (or benchmarks/results)
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) -m pytest -q -m gpu -x tests
	PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/bench_linear.py --out $${OUT:-benchmarks/results/h100}

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
