# Two entry points for a newcomer: `make demo` and `make test` (see README.md).
# Everything heavy is cached under $(LORAKUBE_CACHE): the virtualenv (keyed by the dependency
# pins in pyproject.toml) and the Kubernetes/etcd/helm binaries (keyed by their versions).

SHELL := /bin/bash
LORAKUBE_CACHE ?= $(HOME)/.cache/lorakube
VENV ?= $(LORAKUBE_CACHE)/venv
PYTHON := $(VENV)/bin/python
EXTRAS := operator,trainer,deepspeed,quantize,localcluster,dev
# The venv is rebuilt (incrementally) when the dependency section of pyproject.toml changes.
DEPS_KEY := $(shell sed -n '/^\[project\]/,/^\[project.scripts\]/p' pyproject.toml | sha256sum | cut -c1-16)
DEPS_STAMP := $(VENV)/.lorakube-deps-$(DEPS_KEY)
PYTEST_ARGS ?=

export LORAKUBE_CACHE
export HF_HUB_OFFLINE := 1
export GOTOOLCHAIN := local

.PHONY: env binaries test test-slow test-kueue test-training-operator test-unit test-images images soak demo clean-cluster bench-operator
.PHONY: bench-trainer bench-trainer-gpu

$(DEPS_STAMP): pyproject.toml
	@mkdir -p $(LORAKUBE_CACHE)
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel
	$(PYTHON) -m pip install -q ".[$(EXTRAS)]"
	@rm -f $(VENV)/.lorakube-deps-*
	@touch $@

# The project itself is (re)installed editable on every run: the venv is shared between
# checkouts, and this is what puts *this* checkout's `lorakube` and `lorakube-train` on PATH.
env: $(DEPS_STAMP)
	@$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

binaries: env
	$(PYTHON) -m localcluster build
	$(PYTHON) -m localcluster build s3
	$(PYTHON) -m localcluster build gcs
	$(PYTHON) -m localcluster build azurite

# Two pytest workers, one test file at a time each (--dist loadfile keeps a module's cluster and
# fixtures in one worker): a single worker leaves a core idle while pods start and jobs poll
# (measured on 2 cores: 10 min 54 s with one worker, about 8 min 30 s with two). Each worker brings
# up its own local cluster; several clusters on one host are supported (localcluster/node/README.md).
TEST_WORKERS ?= 2
test: binaries
	$(PYTHON) -m pytest -m "not gpu and not slow and not images and not kueue and not training_operator" -n $(TEST_WORKERS) --dist loadfile -p no:cacheprovider $(PYTEST_ARGS)

# The slow tier (~5 min): costlier variants next to what `make test` keeps (DeepSpeed resume,
# ZeRO-2 against DDP, CUDA OOM through the launcher, a second missing-peer case) and the ~3 min
# operator chaos test (SIGKILLed 10 times under 5 jobs). Run it before
# resolving an issue that touches the trainer's distributed code or its exit codes.
test-slow: binaries
	$(PYTHON) -m pytest -m "slow and not gpu" -n $(TEST_WORKERS) --dist loadfile -p no:cacheprovider $(PYTEST_ARGS)

# The two images, built here without a Docker engine: buildah (vfs, chroot; as root) on a
# debootstrap bookworm standing in for python:3.11-slim (docs/images.md). Installs buildah and
# debootstrap with apt-get when missing; skips an image whose inputs did not change (FORCE=1 rebuilds).
images:
	devtools/images.sh all

# The image tier: each image run as its own user (operator --help, no torch; the trainer trains the
# tiny FLUX model for 2 steps on CPU and writes its LoRA). Root, like `make images`.
test-images: images env
	$(PYTHON) -m pytest -m images tests/images -p no:cacheprovider $(PYTEST_ARGS)

# Jobs admitted and preempted by a real Kueue (tests/e2e/test_kueue_e2e.py, several minutes: four
# training runs one after another). Builds Kueue's manager first (cached under its own key).
test-kueue: binaries
	$(PYTHON) -m localcluster build kueue
	$(PYTHON) -m pytest -m "kueue and not gpu" -p no:cacheprovider $(PYTEST_ARGS)

# Kubeflow's training-operator v1.8.1, the operator benchmark's peer (tests/integration/
# test_training_operator.py, ~1 min once built). Builds it first (cached under its own key; about
# 5 min cold on 2 cores).
test-training-operator: binaries
	$(PYTHON) -m localcluster build training-operator
	$(PYTHON) -m pytest -m "training_operator and not gpu" -p no:cacheprovider $(PYTEST_ARGS)

test-unit: env
	$(PYTHON) -m pytest tests/unit -p no:cacheprovider $(PYTEST_ARGS)

# Slow soak (~5 min on 2 cores): SIGTERM both ranks of a 2-node CPU run 20 times; every process
# must checkpoint the step both ranks agreed on and exit 75 within 15 s (`make test` runs it once).
soak: env
	LORAKUBE_SIGTERM_REPEATS=20 $(PYTHON) -m pytest tests/integration/trainer/test_shutdown.py -p no:cacheprovider -s $(PYTEST_ARGS)

# The operator at scale beside Kubernetes' indexed Job on its own local cluster (README,
# Performance): JOBS jobs x PODS no-op pods; prints the table. JOBS=100 takes a few minutes.
JOBS ?= 10
PODS ?= 4
PEER ?= indexed-job
bench-operator: binaries
	$(PYTHON) bench/operator_scale.py --jobs $(JOBS) --pods $(PODS) --peer $(PEER)

# The trainer's benchmarks (README "Performance"): the framework's CPU overhead against a bare PyTorch
# loop, then the real-size GPU script run on the tiny models (a few minutes on 2 cores). On a machine
# with a GPU, bench-trainer-gpu prints the real-size table (all four families, every variant).
bench-trainer: env
	$(PYTHON) bench/cpu_overhead.py
	$(PYTHON) bench/trainer_gpu.py --tiny

bench-trainer-gpu: env
	$(PYTHON) bench/trainer_gpu.py

demo: binaries
	$(VENV)/bin/lorakube-dev demo

clean-cluster: env
	$(PYTHON) -m localcluster down
