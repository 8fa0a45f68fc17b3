# Two commands do all the set-up on a fresh machine:
#   make demo   -> venv, package, offline Fashion-MNIST (Debian package), then train the quickstart recipe
#   make test   -> venv, package + test extras (+ SpikingJelly, --no-deps), offline data, the Cortex-M4
#                  toolchain and QEMU (apt), then the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)
FMNIST := /usr/share/datasets/fashion-mnist
ARM_TOOLS := gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm

.PHONY: demo test test-fast test-portable-kernels lint bench install data cortex-m4-tools layer-tables clean

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

# The C target's Cortex-M4 tests: bare-metal toolchain + newlib (memset/memcpy for the firmware) + QEMU
cortex-m4-tools:
	@if command -v qemu-system-arm >/dev/null 2>&1 && command -v arm-none-eabi-gcc >/dev/null 2>&1 && \
	    [ -f "$$(arm-none-eabi-gcc -print-file-name=libc.a)" ]; then echo "Cortex-M4: arm-none-eabi-gcc, newlib, qemu-system-arm"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $(ARM_TOOLS) || \
	  echo "Cortex-M4: could not install $(ARM_TOOLS); those tests are skipped"; \
	else echo "Cortex-M4: no apt here; install $(ARM_TOOLS) to run those tests (skipped without them)"; fi

demo: install data
	$(BIN)/ndsnn train recipes/quickstart.toml --out runs/quickstart --resume

test: install data cortex-m4-tools
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The host-sensitive tests once more on ATen's portable CPU kernels (no AVX), the path another host's CPU
# may take: export verification (runtime, ONNX, C), the sparse kernels against the dense path, resume.
# CI runs it after `make test`; random order: pytest -p random_order --random-order-seed=N.
HOST_SENSITIVE := tests/test_kernels.py tests/test_export.py tests/test_export_c.py tests/test_deploy.py \
  tests/test_train.py tests/test_reliability.py::test_kill_9_at_random_points_then_resume_matches_an_uninterrupted_run \
  tests/test_nir_readers.py::test_mlp_nir_runs_identically_in_the_readers_at_their_default_dt
test-portable-kernels: install data
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -p no:randomly $(HOST_SENSITIVE)

lint: install
	$(BIN)/ruff check ndsnn_cli tests benchmarks

bench: install
	$(BIN)/pip install -q --no-deps spikingjelly==2.0.0 && $(BIN)/pip install -q -e '.[bench]'
	MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 $(BIN)/python -m benchmarks.train_step --paired

layer-tables: install  # after changing ndsnn_cli/snn/models.py (a test fails until this is run)
	$(BIN)/python -m ndsnn_cli.cost

clean:
	rm -rf $(VENV) runs build *.egg-info
