# One-command setup: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast test-avx2 demo bench bench-gpu clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# everything (what CI runs); test-fast leaves out the tests marked slow (training, child processes,
# commands and widgets run end to end): units and one-line errors, under a minute on 2 cores.
# -n auto: one pytest-xdist worker per core, at most 4 (on 2 cores: 6-14 minutes, 12-15 one at a time;
# the tests wait on child processes and files as much as they compute)
TESTS_PARALLEL := -n auto --maxprocesses 4

test: $(STAMP)
	$(PY) -m pytest -q $(TESTS_PARALLEL) tests

test-fast: $(STAMP)
	$(PY) -m pytest -q $(TESTS_PARALLEL) -m "not slow" tests

# the whole suite as a CPU without AVX-512 computes it (most laptops, AMD Zen 2/3): PyTorch's own
# kernels and oneDNN's limited to AVX2. Run it before a change lands when this machine has AVX-512
# or AMX: CI runs on one kind of CPU.
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q $(TESTS_PARALLEL) tests

demo: $(STAMP)
	$(PY) -m maskrcnn demo --out demo_out

bench: $(STAMP)
	$(PY) benchmarks/run.py --out bench_out
	$(PY) benchmarks/export_bench.py --out bench_out
	$(PY) benchmarks/engines.py --out bench_out
	$(PY) benchmarks/ranks.py --out bench_out

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py --out bench_out

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
