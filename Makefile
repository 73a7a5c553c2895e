# One-command setup: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m maskrcnn demo --out demo_out

bench: $(STAMP)
	$(PY) benchmarks/run.py --out bench_out
	$(PY) benchmarks/export_bench.py --out bench_out

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
