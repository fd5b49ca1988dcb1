# One-command set-up: `make demo` and `make test` create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.spinefrac-installed
export YOLO_OFFLINE := 1

.PHONY: install demo test test-fast lint docs bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fast,ray,dicom]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install spinefrac with its dev, fast-inference, ray and dicom extras

demo: $(STAMP)  ## synthesise, train, predict and evaluate end to end on the CPU
	$(VENV)/bin/spinefrac demo --out demo_out

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## everything but the slow (training) tests
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)  ## the documentation site into site/ (MkDocs, offline; `make test` builds it too)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)  ## every benchmark, full size (about 1.5 h on 2 cores, plus about 2 h for the ladder; tables in bench_out/)
	$(PY) -m benchmarks.run_all --out bench_out

bench-quick: $(STAMP)  ## every benchmark, small versions (about 10 min)
	$(PY) -m benchmarks.run_all --out bench_out --quick

clean:
	rm -rf demo_out .pytest_cache site
