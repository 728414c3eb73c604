# Set-up and the commands behind every published number.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the builds that pip finds on this kind of machine.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all lint validate sweep plot bench clean

$(BIN)/bnexp: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/bnexp

install: $(BIN)/bnexp

demo: install
	$(BIN)/bnexp run experiments/relu_lr1.yaml

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ''

lint: install
	$(BIN)/ruff check bnexp tests

validate: install
	$(BIN)/bnexp validate experiments/*.yaml

sweep: install
	$(BIN)/bnexp sweep

plot: install
	$(BIN)/bnexp plot results

bench: install
	$(BIN)/bnexp bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
