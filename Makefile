# make demo   set up .venv, then run the quickstart on this machine's default backends
# make test   set up .venv, then run the fast tests (GPU tests skip without a GPU)
# make test-all   the same, then the slow tier: sm90 compile checks, whole runs (what CI runs)
# make bench-e2e  on a CUDA machine: the end-to-end decoder benchmark (benchmarks/bench_e2e.py)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-all cutlass-build-check gpu-check bench-e2e bench clean

# -qq: errors only (this machine's pip configuration warns about index folders it lacks, 34 lines)
# --no-compile: pip would compile the bytecode of all 14,000 modules the venv gets, on one core
# (compiling them all on both took 31-36 s on a 2-core machine); of the 3,900 that the tests
# import, the 2,300 of torch and the packages it brings are compiled on the other core while pip
# installs the rest (below), and Python compiles the others as they are first imported, and keeps
# them: bytecode is written even where the environment turns that off (PYTHONDONTWRITEBYTECODE),
# or every test process would compile torch again (the setup took 56-86 s without compileall,
# 92-104 s with it; each xdist worker compiling torch's on its first import cost it 15 s)
PIP    := $(PY) -m pip install -qq --disable-pip-version-check --no-compile
export PYTHONDONTWRITEBYTECODE =
# (a file of Python 3.12 syntax among torch's test helpers fails to compile: quiet=2 keeps it quiet)
COMPILE_TORCH := import compileall, os, sysconfig; sp = sysconfig.get_paths()["purelib"]; \
	[compileall.compile_dir(os.path.join(sp, p), quiet=2) for p in ("torch", "sympy", "networkx", "mpmath")]

# An isolated venv (no system site-packages: nothing else's plugins or warnings in the tests).
# torch stays pinned: pip takes the local CPU wheel for exactly this version, where an unpinned
# torch would pull gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): $(TORCH_PIN) (CPU), triton, the test tools, FlashInfer and CUTLASS headers"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) $(TORCH_PIN)
	@# the rest, while torch's bytecode compiles on the other core; FlashInfer, for its selection
	@# and error tests: what `import flashinfer` needs here, the package itself in the last run
	@# (its full list of dependencies is for GPUs: the cuDNN frontend, the CUTLASS DSL, ...; a
	@# later install with dependencies would make pip print an ERROR block about those it lacks)
	@$(PY) -c '$(COMPILE_TORCH)' >/dev/null 2>&1 & \
	$(PIP) -e ".[test,triton]" "apache-tvm-ffi>=0.1.11,<0.2" nvidia-ml-py requests tqdm; status=$$?; wait; exit $$status
	@# CUTLASS headers for the compile check of the CUTLASS kernels (its Python deps are for its
	@# own generator, which we do not use), and FlashInfer
	@$(PIP) --no-deps "nvidia-cutlass==4.2.0.0" ninja "flashinfer-python==0.7.2"
	@touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

# the fast tier: everything but the `slow` tier (the sm90 compile checks, whole-benchmark runs);
# worksteal: a worker that runs out of tests takes over some of the other's queue (with `load`,
# tests sent ahead to one worker waited for it there 12 s after the other had finished)
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist worksteal -m "not slow" $(PYTEST_ARGS)

# everything (what CI runs): the fast tier, then the slow tier (the sm90 compile checks, which print their
# progress (-s) as nvcc and ptxas finish each source, a benchmark run and the HF example run)
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
