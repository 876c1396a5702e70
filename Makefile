# kyphowatch: two commands do all set-up.
#   make demo   create .venv, install, run the whole chain on the embedded SQLite default
#   make test   same set-up, then the whole test suite
# Also: make bench (benchmarks), make fuzz (long property-based fuzz of ingest), make lint, make lock (refresh constraints.txt), make clean.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

ifeq ($(shell command -v $(PYTHON) 2>/dev/null),)
PYTHON := python3
endif

.PHONY: demo test bench fuzz lint lock clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# The fuzz test runs a few examples in `make test`; here FUZZ_EXAMPLES of them (with shrinking).
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	KYPHOWATCH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q --timeout=0 tests/test_ingest_fuzz.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -vi '^kyphowatch' > constraints.txt

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis *.egg-info
