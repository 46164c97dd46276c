# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo lint test screenshots

$(VENV)/.fl2t-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Never replace an existing torch; with none, take the CPU build unless CUDA is present.
	$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install torch; \
	  else $(PY) -m pip install torch==2.13.0; fi; }
	$(PY) -m pip install -e '.[test,ui]'
	touch $@

install: $(VENV)/.fl2t-installed

demo: install
	$(VENV)/bin/fl2t demo

# The field's habits first (seconds): lint, formatting, the layers of docs/architecture.md; then the suite.
lint: install
	$(VENV)/bin/ruff check src tests tools
	$(VENV)/bin/ruff format --check src tests tools
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest

# Pictures of the web app's tabs (docs/ui-*.png, shown in the README), taken by the browser test's own steps
# on the tiny world; a plain `make test` writes nothing into the checkout.
screenshots: install
	FL2T_UI_SCREENSHOTS=docs $(PY) -m pytest -q tests/test_ui.py -k browser
