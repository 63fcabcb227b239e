# The two commands of the README. Each creates the virtual environment on first use
# and installs the pinned dependencies into it.
VENV ?= .venv
PYTHON ?= python3

# Offline-safe Flower (DESIGN.md, runtime notes).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/fedinterest simulate simulations/configs/demo.toml --out runs

# Static checks first (configured in pyproject.toml; together well under a minute), then the tests.
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest
