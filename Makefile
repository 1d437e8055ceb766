# Two entry points (README quick start):
#   make demo   set up .venv (once) and run the main job, `flowcodec demo`
#   make test   set up .venv (once) and run the test suite
# The environment is rebuilt only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# Tests and benchmarks find the CIFAR-10 copy beside the checkout when it is there (and
# FLOWCODEC_DATA is not set already); otherwise the variable is left alone.
ifneq ($(wildcard ../shared/data/.),)
export FLOWCODEC_DATA ?= $(abspath ../shared/data)
endif

.PHONY: demo test test-all lint setup clean task-codecs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,serve,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flowcodec demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Retrain every shipped task codec and regenerate their rd and latency results (CPU, ~2 h).
task-codecs: $(STAMP)
	PY=$(BIN)/python bash experiments/make_task_codecs.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
