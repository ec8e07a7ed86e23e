# The two commands of the README. Both create (or reuse) a virtual environment in .venv and
# install diffjax into it; nothing outside the repository is touched.
#   make run    train the embedded default (8x8 digits, offline) and write samples to work/default
#   make test   run the test suite (without the tests marked slow) in two worker processes
#               (pytest-xdist: most of the run is single-threaded XLA compilation)
#   make test-slow  run only the tests marked slow
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= work/default
BIN := $(VENV)/bin
# tcmalloc, where the system has it (Debian/Ubuntu: libtcmalloc-minimal4), speeds up large CPU programs;
# without it the command line tunes glibc's malloc instead (README, Performance)
TCMALLOC ?= $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4))

.PHONY: run test test-slow keys install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: install
	$(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(BIN)/python experiments/main.py --config=configs/default.py --workdir=$(WORKDIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-slow: install
	$(BIN)/python -m pytest -m slow

# every config key of the default run with its value and meaning
keys: install
	$(BIN)/python experiments/main.py --config=configs/default.py --mode=keys

clean:
	rm -rf $(WORKDIR)
