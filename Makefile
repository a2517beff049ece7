# Two commands for a newcomer on a fresh machine (see README.md):
#   make demo   - create .venv, install everything, run the end-to-end demo on a CPU LocalCluster
#   make test   - create .venv, install everything, run the test suite
# On a GPU machine install your CUDA build of torch into .venv first, or pass TORCH=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIPFLAGS ?= -q

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIPFLAGS) --upgrade pip
	@# torch first: a bare torch requirement with no torch installed pulls a multi-GB CUDA build.
	$(PY) -m pip install $(PIPFLAGS) "$(TORCH)"
	$(PY) -m pip install $(PIPFLAGS) -e ".[data,test,bench]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/distlabels demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf demo_output .pytest_cache
