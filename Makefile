# Every user-facing target first makes .venv and installs requirements.txt if needed.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= pipeline_configs/digits.yaml
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup test test-keras3 test-keras2 lint

$(STAMP): requirements.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

setup: $(STAMP)

# The whole suite under Keras 3, then the model/pipeline tests again under Keras 2.
test: test-keras3 test-keras2

test-keras3: $(STAMP)
	$(PYTHON) -m pytest -q tests

test-keras2: $(STAMP)
	TF_USE_LEGACY_KERAS=1 $(PYTHON) -m pytest -q -m keras2 tests

lint: $(STAMP)
	$(PYTHON) -m vermin --no-tips --violations -t=3.8- ipu_diffusion
	$(PYTHON) -m compileall -q ipu_diffusion benchmarks tests
