# Every user-facing target first makes .venv and installs requirements.txt if needed.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= pipeline_configs/digits.yaml
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
# RESUME=1 continues the run in WORKDIR from its newest checkpoint.
RESUME_FLAG := $(if $(RESUME),--resume,)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup test test-keras3 test-keras2 lint train sample train-ipu bench

$(STAMP): requirements.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

setup: $(STAMP)

# The whole suite under Keras 3, then the model/pipeline tests again under Keras 2.
test: test-keras3 test-keras2

test-keras3: $(STAMP)
	$(PYTHON) -m pytest -q --durations=12 tests

test-keras2: $(STAMP)
	TF_USE_LEGACY_KERAS=1 $(PYTHON) -m pytest -q --durations=8 -m keras2 tests

lint: $(STAMP)
	$(VENV)/bin/vermin --no-tips --violations -t=3.8- ipu_diffusion
	$(PYTHON) -m compileall -q ipu_diffusion benchmarks tests

# Train CONFIG (default: the embedded digits, a few minutes on a CPU) into WORKDIR.
train: $(STAMP)
	$(PYTHON) -m ipu_diffusion train --config $(CONFIG) --workdir $(WORKDIR) $(RESUME_FLAG)

# Sample a grid (PNG + .npz) from WORKDIR's newest checkpoint with DDIM.
sample: $(STAMP)
	$(PYTHON) -m ipu_diffusion sample --workdir $(WORKDIR) --num 64 --sampler ddim --steps 50

# The same trainer on Graphcore IPUs (needs the Poplar SDK); IPU_MODEL=1 uses the emulator.
train-ipu: $(STAMP)
	$(if $(IPU_MODEL),TF_POPLAR_FLAGS="$$TF_POPLAR_FLAGS --use_ipu_model",) $(PYTHON) -m ipu_diffusion train-ipu --config $(CONFIG) --workdir $(WORKDIR) $(RESUME_FLAG) \
		$(if $(IPU_MODEL),--set ipu.ipu_model=true,)

# Throughput, MFU, sampling, pipeline-overhead and memory benchmarks: JSON + PNG charts in
# benchmarks/results/ (quick mode, ~10 minutes on 2 cores; FULL=1 for the long version).
bench: $(STAMP)
	FULL=$(FULL) $(PYTHON) benchmarks/run_all.py
