# Two commands do all the set-up on a fresh machine:
#   make demo   -> venv, package, offline Fashion-MNIST (Debian package), then train the quickstart recipe
#   make test   -> venv, package + test extras (+ SpikingJelly, --no-deps), offline data, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast lint bench install data layer-tables clean

$(BIN)/ndsnn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps spikingjelly==2.0.0  # NIR reader tests; its requirements pull a CUDA torch
	@touch $@

install: $(BIN)/ndsnn

data:
	@if [ -d $(FMNIST) ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST: no apt here; set [data] root or download = true in the recipe"; fi

demo: install data
	$(BIN)/ndsnn train recipes/quickstart.toml --out runs/quickstart --resume

test: install data
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check ndsnn_cli tests benchmarks

bench: install
	$(BIN)/pip install -q --no-deps spikingjelly==2.0.0 && $(BIN)/pip install -q -e '.[bench]'
	MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 $(BIN)/python -m benchmarks.train_step --paired

layer-tables: install  # after changing ndsnn_cli/snn/models.py (a test fails until this is run)
	$(BIN)/python -m ndsnn_cli.cost

clean:
	rm -rf $(VENV) runs build *.egg-info
