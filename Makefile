# natgrad: `make test` and `make demo` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH := torch==2.13.0

.PHONY: test lint bench-fisher clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -e '.[dev]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

bench-fisher: $(VENV)/.installed
	$(PY) -m pip install --quiet $(TORCH) curvlinops-for-pytorch
	$(PY) -m pip install --quiet --no-deps nngeometry
	$(PY) benchmarks/fisher_peers.py --write benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) build src/*.egg-info
