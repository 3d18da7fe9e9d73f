# One entry point for everything a developer runs. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
.PHONY: help venv system-deps test test-fast lint format demo

DEMO := local/demo
# The demo job, for `make demo` on this machine and `make train-local` in the image: 3 folds
# x 4 epochs at 64 px run in minutes on a CPU. PRETRAINED (below) is false for images built
# without weights.
DEMO_HYPERPARAMETERS = {"target_species": "Lycorma delicatula,Zenaida macroura,Acer rubrum,Erigeron canadensis", "k_folds": "3", "num_epochs": "4", "img_size": "64", "batch_size": "16", "holdout_fraction": "0.15", "pretrained": "$(PRETRAINED)"}

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/.installed: requirements-torch.txt requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check \
		-r requirements-torch.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --editable .
	touch $@

venv: $(BIN)/.installed ## build .venv (idempotent: reinstalls only when the pins change)

system-deps: ## install the system packages the container tests need (podman...), only those missing
	scripts/system_deps.sh

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads take the
# cores from the ones with work (a 15 s test fixture took 480 s). container/serve does the same.
test test-fast demo: export OMP_WAIT_POLICY ?= PASSIVE

test: venv system-deps ## run the whole test suite (CI's command)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

test-fast: venv ## the edit-test loop: everything but the slow, container and GPU tests (minutes)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not container and not gpu"

lint: venv ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: venv ## train on a generated demo dataset (CPU is fine) and print where the report is
	rm -rf $(DEMO) && mkdir -p $(DEMO)/input/config
	$(BIN)/python -m species_classifier.demo_data $(DEMO)/input/data/training --photos-per-species 12 \
		--stand-in-weights $(DEMO)/torch_home
	echo '$(DEMO_HYPERPARAMETERS)' > $(DEMO)/input/config/hyperparameters.json
	SAGEMAKER_BASE_DIR=$(CURDIR)/$(DEMO) TORCH_HOME=$(CURDIR)/$(DEMO)/torch_home PATH="$(CURDIR)/$(BIN):$$PATH" container/train
	@echo "report: $(DEMO)/output/data/report.md  model: $(DEMO)/model/"

format: venv ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# ---- The image: build, push, and run it locally as SageMaker would (docs/container.md) ----
# DOCKER: docker where its engine answers, else podman (machines without a Docker engine).
DOCKER ?= $(shell docker info >/dev/null 2>&1 && echo docker || { command -v podman >/dev/null && echo podman || echo docker; })
IMAGE ?= species-classifier:latest
# SageMaker's training and GPU instances run linux/amd64 only; the base image and the build
# follow PLATFORM whatever this machine is (linux/arm64 is for Graviton endpoints only).
PLATFORM ?= linux/amd64
# A host folder laid out as /opt/ml; DATA: a training channel (CSV + photos), default demo photos.
LOCAL_ML ?= local/opt_ml
DATA ?=
HYPERPARAMETERS ?=
PRETRAINED ?= $(if $(filter skip,$(PRETRAINED_WEIGHTS)),false,true)
SHM_SIZE ?= 2g
PORT ?= 8080
PHOTO ?=
RUN_FLAGS ?= $(if $(filter podman,$(notdir $(DOCKER))),--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
GPU_FLAGS ?= $(if $(shell nvidia-smi -L 2>/dev/null),--gpus all)
RUN_IMAGE = $(DOCKER) run --rm $(RUN_FLAGS)

.PHONY: base-image build push train-local serve-local predict-local sdk-venv

base-image: ## make a local Debian base image for PLATFORM (no registry needed) and print its name for BASE_IMAGE
	DOCKER=$(DOCKER) PLATFORM=$(PLATFORM) scripts/make_base_image.sh

build: ## build the image for PLATFORM from container/Dockerfile, tagged with the git commit and :latest
	DOCKER=$(DOCKER) PLATFORM=$(PLATFORM) scripts/build_push.sh --no-push

push: venv ## build, then push to ECR (AWS_REGION and credentials needed) and print the image URI
	DOCKER=$(DOCKER) PLATFORM=$(PLATFORM) PYTHON=$(CURDIR)/$(BIN)/python scripts/build_push.sh

train-local: ## run the image's `train` on LOCAL_ML laid out as /opt/ml (DATA=folder, default demo photos)
	mkdir -p $(LOCAL_ML)/input/config $(LOCAL_ML)/input/data/training $(LOCAL_ML)/model $(LOCAL_ML)/output
	$(if $(HYPERPARAMETERS),cp $(HYPERPARAMETERS),echo '$(DEMO_HYPERPARAMETERS)' >) $(LOCAL_ML)/input/config/hyperparameters.json
	$(if $(DATA),,test -f $(LOCAL_ML)/input/data/training/train.csv || $(RUN_IMAGE) -v $(abspath $(LOCAL_ML)):/opt/ml $(IMAGE) python3 -m species_classifier.demo_data /opt/ml/input/data/training)
	$(RUN_IMAGE) $(GPU_FLAGS) --shm-size $(SHM_SIZE) -v $(abspath $(LOCAL_ML)):/opt/ml \
	  $(if $(DATA),-v $(abspath $(DATA)):/opt/ml/input/data/training:ro) $(IMAGE) train

serve-local: ## serve LOCAL_ML/model on http://localhost:PORT with the image's `serve` (Ctrl-C stops)
	$(RUN_IMAGE) $(GPU_FLAGS) -p $(PORT):8080 -v $(abspath $(LOCAL_ML))/model:/opt/ml/model:ro $(IMAGE) serve

predict-local: ## send PHOTO (default: a demo photo) to the local endpoint and print the answer
	curl --silent --show-error --fail-with-body -H 'Content-Type: application/x-image' \
	  --data-binary @$(or $(PHOTO),$(firstword $(wildcard $(LOCAL_ML)/input/data/training/images/*/*.jpg))) \
	  http://localhost:$(PORT)/invocations
	@echo

# ---- The GPU check: every GPU claim in one prepared run (docs/gpu-check.md) ----
# A GPU machine may have no .venv and no package index: there its python3 holds torch, and
# the packages it lacks travel in .whl, which `make gpu-wheels` fills here.
GPU_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_CHECK_ARGS ?=

.PHONY: gpu-wheels gpu-check

gpu-wheels: venv ## download what a GPU machine lacks (CPython 3.12, x86-64) into .whl
	$(BIN)/python scripts/gpu_check.py --prepare-wheels .whl

gpu-check: ## on a GPU machine: GPU tests and benchmarks in one run (<= 8 min), tables in $$OUT
	$(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# The SageMaker Python SDK, for its local mode (docs/container.md), in a venv of its own: its
# pins clash with the project's.
SDK_VENV := .venv-sdk

$(SDK_VENV)/.installed: requirements-sdk.txt
	test -x $(SDK_VENV)/bin/python || $(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-sdk.txt
	touch $@

sdk-venv: $(SDK_VENV)/.installed ## the SageMaker Python SDK in .venv-sdk, for local mode runs of the image
