# make demo   set up .venv, then run the quickstart on this machine's default backends
# make test   set up .venv, then run the fast tests (GPU tests skip without a GPU)
# make test-all   the same, then the sm90 compile checks (what CI runs)
# make bench-e2e  on a CUDA machine: the end-to-end decoder benchmark (benchmarks/bench_e2e.py)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-all cutlass-build-check gpu-check bench-e2e bench clean

# -qq: errors only (this machine's pip configuration warns about index folders it lacks, 34 lines)
# --no-compile: pip compiles each package's bytecode on one core; one compileall over the venv
# below does it on all of them (2-core machine: the setup took 88 s against 104)
PIP    := $(PY) -m pip install -qq --disable-pip-version-check --no-compile
NO_BYTECODE := /tests/|/transformers/models/(?!(llama|qwen2|mistral|phi3|gemma|auto)/|__init__)|/site-packages/pip/

# An isolated venv (no system site-packages: nothing else's plugins or warnings in the tests).
# torch stays pinned: pip takes the local CPU wheel for exactly this version, where an unpinned
# torch would pull gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): $(TORCH_PIN) (CPU), triton, the test tools, FlashInfer and CUTLASS headers"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) $(TORCH_PIN)
	@$(PIP) -e ".[test,triton]"
	@# FlashInfer, for its selection and error tests: what `import flashinfer` needs, then the
	@# package alone, last (its full list of dependencies is for GPUs: the cuDNN frontend, the
	@# CUTLASS DSL, ...; installing anything with dependencies after it would make pip print
	@# an ERROR block about those it lacks)
	@$(PIP) "apache-tvm-ffi>=0.1.11,<0.2" nvidia-ml-py requests tqdm
	@# CUTLASS headers for the compile check of the CUTLASS kernels (its Python deps are for its
	@# own generator, which we do not use)
	@$(PIP) --no-deps "nvidia-cutlass==4.2.0.0" ninja
	@# the bytecode of what the tests import (a few packages ship files that do not compile,
	@# which nothing imports: compileall's status is not the setup's); not the packages' own tests,
	@# the Hugging Face architectures the tests do not build, or pip (8 s of 36 on 2 cores)
	@$(PY) -m compileall -q -j 0 -x '$(NO_BYTECODE)' $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") > /dev/null 2>&1 || true
	@# FlashInfer last and without its bytecode: its 3,400 modules' took 28 s on 2 cores, for tests
	@# that import it in a few processes, 1.5 s slower each without it
	@$(PIP) --no-deps "flashinfer-python==0.7.2"
	@touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

# the fast tier: everything but the `slow` tier (the sm90 compile checks, whole-benchmark runs)
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# everything (what CI runs): the fast tier, then the sm90 compile checks, which print their
# progress (-s) as nvcc and ptxas finish each source
test-all: test
	$(PY) -m pytest -m slow -s -v -p no:xdist $(PYTEST_ARGS)

# nvcc compiles every CUTLASS source for sm_90a (no GPU needed; `make test-all` runs it too when nvcc is there)
cutlass-build-check: $(VENV)/.installed
	$(PY) -m qlinear_pass.kernels.cutlass_build --compile-only

# on a CUDA machine: every GPU test, then the benchmark; results under $$OUT (or benchmarks/results)
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) -m pytest -q -m gpu -x tests
	PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/bench_linear.py --out $${OUT:-benchmarks/results/h100}

# on a CUDA machine: the end-to-end benchmark (bf16 and every default variant); results under
# $$OUT (or benchmarks/results/<card>/e2e); E2E_ARGS adds arguments, e.g. E2E_ARGS=--quick
E2E_ARGS ?=
bench-e2e:
	PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/bench_e2e.py $${OUT:+--out $$OUT} $(E2E_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
