# metalab front door. `make help` lists the targets.
# Every target that runs Python first makes .venv (once) and installs metalab into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where there is no NVIDIA GPU, torch comes from PyTorch's CPU-only index when it can be
# reached (a ~200 MB wheel instead of a multi-GB CUDA build); otherwise from the default
# sources, which on the metalab CI machines hold the CPU wheel already.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
CKPT ?=
PYTEST_WORKERS ?=
# The code before the speed work: `make bench` times ProtoNet's training episodes against it in a
# temporary git worktree (docs/speed.md).
BENCH_BASELINE ?= c1ec8a9

.DEFAULT_GOAL := help
.PHONY: help install lock train eval export serve sweep reproduce tensorboard lint test test-full bench bench-memory device-carry device-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  Pass Hydra overrides with ARGS='...', e.g. make train ARGS='algorithm=protonet dataset=omniglot'"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The exact versions `make install` takes (pip-tools' lock of pyproject.toml's ranges with every
# extra CI uses): one file per Python minor version, so a fresh install on any day gets the same
# packages. `make lock` refreshes it on purpose. Without a lock for this Python, the ranges.
PY_MINOR = $(shell $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK ?= requirements/py$(PY_MINOR).lock
PIP_TOOLS_VERSION ?= 7.7.0
LOCK_TOOLS := $(VENV)-lock-tools

$(VENV)/.installed: pyproject.toml $(wildcard $(LOCK)) | $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if nvidia-smi -L >/dev/null 2>&1; then \
	    $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	  elif $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=3)" 2>/dev/null; then \
	    $(BIN)/pip install "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	  else \
	    $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	  fi; \
	fi
	@if [ -f "$(LOCK)" ]; then \
	  echo "$(BIN)/pip install -r $(LOCK)  (the locked versions; make lock refreshes them)"; \
	  $(BIN)/pip install -r "$(LOCK)" && $(BIN)/pip install --no-deps -e ".[test,optuna,slurm,export,serve]"; \
	else \
	  echo "no $(LOCK) for Python $(PY_MINOR): installing the newest versions pyproject.toml's ranges admit (make lock pins them)"; \
	  $(BIN)/pip install -e ".[test,optuna,slurm,export,serve]"; \
	fi
	@touch $@

install: $(VENV)/.installed ## create .venv and install metalab (CPU torch where there is no GPU)

train: install ## meta-train (default: MAML on sinusoid, CPU, a few minutes), then meta-test
	$(BIN)/metalab-train $(ARGS)

eval: install ## meta-test a checkpoint: make eval CKPT=logs/train/runs/<run>/checkpoints/last.ckpt
	@test -n "$(CKPT)" || { echo "make eval needs CKPT=<path to a .ckpt file>"; exit 2; }
	$(BIN)/metalab-eval ckpt_path=$(CKPT) $(ARGS)

export: install ## a checkpoint as an ONNX graph (docs/export.md): make export ARGS='ckpt_path=<file> format=onnx output=<file.onnx>'
	$(BIN)/metalab-export $(ARGS)

serve: install ## the HTTP service (docs/serving.md): make serve ARGS='ckpt_path=pretrained:protonet-omniglot port=8000'
	$(BIN)/metalab-serve $(ARGS)

sweep: install ## a Hydra multirun: MAML and ProtoNet on Omniglot 5-way 1-shot (their paper settings)
	$(BIN)/metalab-train -m experiment=maml_omniglot_5w1s,protonet_omniglot_5w1s $(ARGS)

reproduce: install ## reproduce paper settings into results/ and the README: make reproduce ARGS='protonet_omniglot_5w1s' (or '--collect <run dir>', '--readme')
	$(BIN)/python scripts/reproduce.py $(ARGS)

tensorboard: install ## serve the TensorBoard logs of all runs under logs/
	$(BIN)/tensorboard --logdir logs --bind_all

lint: install ## ruff check and ruff format --check: the rules and style in pyproject.toml ([tool.ruff])
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install ## the test suite (under 10 minutes on 2 cores; slow tests excluded)
	$(BIN)/pytest $(ARGS)

test-full: install ## every test, the slow ones included
	METALAB_REQUIRE_BROWSER=1 $(BIN)/pytest -m "slow or not slow" $(ARGS)

bench: install ## the speed floors (docs/speed.md): MAML batched vs a per-task loop, metric learners, ProtoNet vs the code before the speed work; predict speed
	$(BIN)/python scripts/bench.py $(ARGS)
	@if git rev-parse --verify --quiet "$(BENCH_BASELINE)^{commit}" >/dev/null 2>&1; then \
	  echo "$(BIN)/python scripts/bench_against.py $(BENCH_BASELINE) --learner protonet --rounds 20"; \
	  $(BIN)/python scripts/bench_against.py $(BENCH_BASELINE) --learner protonet --rounds 20; \
	else \
	  echo "(ProtoNet against $(BENCH_BASELINE) skipped: not a git checkout that holds that commit)"; \
	fi
	$(BIN)/python scripts/bench_predict.py

bench-memory: install ## peak memory of second-order, checkpointed and first-order MAML (Omniglot 20-way, slow on CPU)
	$(BIN)/python scripts/bench_memory.py $(ARGS)

lock: | $(BIN)/python ## refresh requirements/py<python>.lock: the newest versions pyproject.toml's ranges admit, torch at TORCH_VERSION; then make install
	@# pip-compile resolves for the Python it runs on: its own venv, made from the project's Python.
	@test -x $(LOCK_TOOLS)/bin/pip-compile || { $(BIN)/python -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q "pip-tools==$(PIP_TOOLS_VERSION)"; }
	mkdir -p $(dir $(LOCK))
	echo "torch==$(TORCH_VERSION)" > $(LOCK_TOOLS)/torch.txt
	@# torch's CPU build where there is no NVIDIA GPU (as install takes it): its CUDA build would put
	@# the nvidia-* packages in the lock, which torch itself pins exactly where it needs them.
	CUSTOM_COMPILE_COMMAND='make lock' $(LOCK_TOOLS)/bin/pip-compile --quiet --upgrade --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  --extra test --extra optuna --extra slurm --extra export --extra serve \
	  $$(nvidia-smi -L >/dev/null 2>&1 || ! $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=3)" 2>/dev/null || echo --extra-index-url $(TORCH_CPU_INDEX)) \
	  --constraint $(LOCK_TOOLS)/torch.txt --output-file $(LOCK) pyproject.toml
	@# A local build tag (2.13.0+cpu) is the same release: the lock names the release, install picks the build.
	sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$$/\1/' $(LOCK)
	@grep -qE '^(nvidia-|triton==)' $(LOCK) && echo "warning: $(LOCK) pins CUDA packages; on a CPU machine make lock takes torch's CPU build" || true
	rm -f $(VENV)/.installed

device-carry: install ## fill device_carry/ (git-ignored) with the wheels and Omniglot archives a GPU machine lacks
	mkdir -p device_carry/wheels device_carry/data/omniglot
	$(BIN)/pip wheel -q --no-deps -w device_carry/wheels \
	  "hydra-core==$$($(BIN)/python -c 'import hydra; print(hydra.__version__)')" \
	  "omegaconf==$$($(BIN)/python -c 'import omegaconf; print(omegaconf.__version__)')" \
	  "antlr4-python3-runtime==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("antlr4-python3-runtime"))')"
	cp -r --no-preserve=mode "$${METALAB_DATA_DIR:-data}"/omniglot/images_background.zip "$${METALAB_DATA_DIR:-data}"/omniglot/images_evaluation.zip \
	  "$${METALAB_DATA_DIR:-data}"/omniglot/SHA256SUMS "$${METALAB_DATA_DIR:-data}"/omniglot/splits device_carry/data/omniglot/

device-check: ## the prepared GPU check (scripts/device_check.sh): figures to device_results/; ARGS='--smoke' on a CPU
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) bash scripts/device_check.sh $(ARGS)

clean: ## remove run outputs and caches (keeps .venv and the decoded-image cache)
	rm -rf logs outputs multirun lightning_logs .pytest_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
