# Every user-facing target first makes .venv and installs requirements.txt if needed.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= pipeline_configs/digits.yaml
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
# RESUME=1 continues the run in WORKDIR from its newest checkpoint.
RESUME_FLAG := $(if $(RESUME),--resume,)
# SET="training.steps=200 eval.num_samples=0" overrides config keys (space-separated).
SET_FLAGS := $(foreach s,$(SET),--set $(s))
# VERBOSE=1 shows TensorFlow's C++ start-up lines, which the CLI hides (--verbose).
VERBOSE_FLAG := $(if $(VERBOSE),--verbose,)
# Tests and benchmarks: TensorFlow's C++ info and warning lines off, errors kept. The CLI
# targets (train, sample, train-ipu) leave it to the CLI's quiet start.
test test-keras3 test-keras2 lint soak bench bench-diffusers bench-torch bench-recipes bench-sampling: export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup test test-keras3 test-keras2 lint soak train sample train-ipu bench bench-diffusers \
	bench-torch bench-recipes bench-sampling

# requirements.txt first, then the project itself, editable (pyproject.toml; the
# ipu-diffusion command in .venv/bin). No build isolation: the venv's setuptools builds it,
# so this step needs no download beyond requirements.txt's.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)

# The whole suite under Keras 3, then the model/pipeline tests again under Keras 2.
# Each file runs on one worker; tests/conftest.py hands them out slowest first
# (--no-loadscope-reorder keeps that order instead of xdist's most-tests-first).
test: test-keras3 test-keras2

test-keras3: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=12 tests

test-keras2: $(STAMP)
	TF_USE_LEGACY_KERAS=1 $(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=8 -m keras2 tests

lint: $(STAMP)
	$(VENV)/bin/vermin --no-tips --violations -t=3.8- ipu_diffusion
	$(PYTHON) -m compileall -q ipu_diffusion benchmarks tests

# Fault injection at length: SIGKILL training at SOAK_KILLS seeded random moments (some
# inside checkpoint saves), resume each time, and check the result equals an
# uninterrupted run bit for bit (the test suite does 3 kills, the first inside a save;
# 50 take ~10 min on 2 cores).
SOAK_KILLS ?= 50
SOAK_SEED ?= 0
soak: $(STAMP)
	SOAK_KILLS=$(SOAK_KILLS) SOAK_SEED=$(SOAK_SEED) $(PYTHON) -m pytest -q -s -p no:cacheprovider \
		tests/training/test_reliability_sigkill.py

# Train CONFIG (default: the embedded digits, a few minutes on a CPU) into WORKDIR.
train: $(STAMP)
	$(PYTHON) -m ipu_diffusion $(VERBOSE_FLAG) train --config $(CONFIG) --workdir $(WORKDIR) $(RESUME_FLAG) $(SET_FLAGS)

# Sample a grid (PNG + .npz) from WORKDIR's newest checkpoint with DDIM.
sample: $(STAMP)
	$(PYTHON) -m ipu_diffusion $(VERBOSE_FLAG) sample --workdir $(WORKDIR) --num 64 --sampler ddim --steps 50

# The same trainer on Graphcore IPUs (needs the Poplar SDK); IPU_MODEL=1 uses the emulator.
train-ipu: $(STAMP)
	$(if $(IPU_MODEL),TF_POPLAR_FLAGS="$$TF_POPLAR_FLAGS --use_ipu_model",) $(PYTHON) -m ipu_diffusion $(VERBOSE_FLAG) train-ipu --config $(CONFIG) --workdir $(WORKDIR) $(RESUME_FLAG) \
		$(if $(IPU_MODEL),--set ipu.ipu_model=true,)

# Throughput, MFU, sampling, pipeline-overhead and memory benchmarks: JSON + PNG charts in
# benchmarks/results/ (quick mode, ~10 minutes on 2 cores; FULL=1 for the long version).
bench: $(STAMP)
	FULL=$(FULL) $(PYTHON) benchmarks/run_all.py

# Baseline: Hugging Face diffusers (PyTorch) on the same digits, CPU and wall time, scored by
# our own digits evaluation. PyTorch lives in its own venv, .venv-torch (not in
# requirements.txt): train + sample there, score under .venv. DIFFUSERS_SECONDS defaults to
# the README's make-train training time; DIFFUSERS_ARGS passes more options to the train
# step (e.g. --beta-schedule squaredcos_cap_v2 --lr 1e-3, or --cpu-seconds 600).
TORCH_VENV := .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.installed
DIFFUSERS_SECONDS ?= 395
DIFFUSERS_SAMPLES ?= 1000
DIFFUSERS_ARGS ?=
DIFFUSERS_NPZ ?= benchmarks/results/diffusers_digits.npz
DIFFUSERS_JSON ?= benchmarks/results/diffusers_baseline.json

$(TORCH_STAMP):
	@test -x $(TORCH_VENV)/bin/python || $(PY) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(TORCH_VENV)/bin/python -m pip install --quiet diffusers numpy scikit-learn
	@touch $(TORCH_STAMP)

bench-diffusers: $(STAMP) $(TORCH_STAMP)
	$(TORCH_VENV)/bin/python benchmarks/diffusers_baseline.py train --seconds $(DIFFUSERS_SECONDS) \
		--num-samples $(DIFFUSERS_SAMPLES) --out $(DIFFUSERS_NPZ) $(DIFFUSERS_ARGS)
	$(PYTHON) benchmarks/diffusers_baseline.py score --samples $(DIFFUSERS_NPZ) --out $(DIFFUSERS_JSON)

# Baseline: the ddpm_cifar10 training step (batch 16, fp32 and autocast bf16) in PyTorch
# with diffusers' UNet2DModel (google/ddpm-cifar10-32's config, 35,746,307 parameters), img/s
# and MFU measured like train_throughput.py's cifar rows (same FLOP count, interleaved with
# torch matmuls). Under .venv-torch only, no TensorFlow. Writes
# benchmarks/results/$(TORCH_BENCH_OUT).json; TORCH_BENCH_ARGS passes more options
# (e.g. --rounds 9, --compare-layouts, --threads 1, --omp-wait-policy passive).
TORCH_BENCH_OUT ?= torch_cifar_step
TORCH_BENCH_ARGS ?=

bench-torch: $(TORCH_STAMP)
	$(TORCH_VENV)/bin/python benchmarks/torch_cifar_step.py --precision fp32 bf16 \
		--out $(TORCH_BENCH_OUT) $(TORCH_BENCH_ARGS)

# Whole-process sampling, back to back: `sample --num 1000` (DDIM-50, fp32 and bf16) against
# diffusers' DDIMPipeline on the same-size UNet2DModel (benchmarks/sampling_process.py;
# ~10 min on 2 cores). SAMPLING_ARGS e.g. --rounds 5 or --workdir runs/digits.
SAMPLING_ARGS ?=
bench-sampling: $(STAMP) $(TORCH_STAMP)
	$(PYTHON) benchmarks/sampling_process.py $(SAMPLING_ARGS)

# The digits recipe experiment: each recipe trained in the time of RECIPE_BUDGET default
# steps (make train's 3,000 by default) and scored like make train, with its checkpoints at
# 1/3 and 2/3 (benchmarks/digits_recipe.py; ~9 min per recipe and seed on 2 idle cores).
# RECIPES=default,minsnr5 SEEDS=0,1,2 narrow it; results/digits_recipe.json and _<budget>.png.
RECIPES ?=
SEEDS ?= 0
RECIPE_BUDGET ?= 3000
bench-recipes: $(STAMP)
	$(PYTHON) benchmarks/digits_recipe.py --budget-steps $(RECIPE_BUDGET) --seeds $(SEEDS) \
		$(if $(RECIPES),--recipes $(RECIPES),)
