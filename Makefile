# Set-up and the commands behind every published number.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the builds that pip finds on this kind of machine.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# The GPU targets use .venv (installing it first) by default. On a machine whose Python
# already has torch and bnexp's other dependencies (an offline GPU node, say), run them from
# the checkout without installing anything:
#   make bench-gpu INSTALL= BNEXP='python3 -m bnexp' PYTEST='python3 -m pytest'
INSTALL ?= install
BNEXP ?= $(BIN)/bnexp
PYTEST ?= $(BIN)/python -m pytest

.PHONY: install demo test test-threads test-all test-browser browser lint validate sweep extras seeds plot report bench bench-gpu test-gpu clean

$(BIN)/bnexp: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev,tensorboard,ray]'
	touch $(BIN)/bnexp

install: $(BIN)/bnexp

demo: install
	$(BIN)/bnexp run experiments/relu_lr1.yaml

test: install
	$(BIN)/python -m pytest

# The suite's verdict must not depend on threads or parallel workers (see README).
test-threads: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto
	OMP_NUM_THREADS=4 $(BIN)/python -m pytest -q -n 2

# Headless Chromium for the report's browser test (Debian's package; needs root or sudo).
browser:
	command -v chromium >/dev/null || (apt-get install -y -q chromium || sudo apt-get install -y -q chromium)

test-browser: install browser
	$(BIN)/python -m pytest -q tests/test_browser.py

test-all: install
	$(BIN)/python -m pytest -m ''

lint: install
	$(BIN)/ruff check bnexp tests

validate: install
	$(BIN)/bnexp validate experiments/*.yaml

sweep: install
	$(BIN)/bnexp sweep

EXTRAS := activations_inits bn_placement bn_decay_scale clipping small_batches manual_bn convnet
extras: install
	$(BIN)/bnexp run experiments/train_vs_inference.yaml
	$(BIN)/bnexp run experiments/paper_fig1.yaml
	$(BIN)/bnexp bn-check
	for e in $(EXTRAS); do $(BIN)/bnexp sweep experiments/$$e.yaml && \
		$(BIN)/bnexp report results/$$e || exit 1; done

seeds: install
	$(BIN)/bnexp sweep experiments/relu_grid_5seeds.yaml --seeds 5
	$(BIN)/bnexp report results/relu_grid_5seeds

plot: install
	$(BIN)/bnexp plot results

report: install
	$(BIN)/bnexp report results

bench: install
	$(BIN)/bnexp bench --grid experiments/lesson_grid.yaml

# The README's GPU table, every row in one go (JSON records in results/bench/, the pair's
# output, whose last line times it, in results/bench/pair-*.txt), then the CUDA tests.
GPU_OUT := results/bench
bench-gpu: $(INSTALL)
	mkdir -p $(GPU_OUT)
	$(BNEXP) bench --device cuda --models 24 --grid experiments/lesson_grid.yaml
	$(BNEXP) bench --device cuda --compile --models 24 --grid experiments/lesson_grid.yaml
	$(BNEXP) bench --device cuda --compile --models 24 --grid experiments/lesson_grid.yaml \
		--grid-seeds 10
	$(BNEXP) bench --device cuda --compile --models 2,32,256,1024,4096 --steps 3000
	$(BNEXP) bench --device cuda --compile --tf32 --models 256,4096 --steps 3000
	$(BNEXP) run experiments/relu_lr1.yaml --device cuda --force --out $(GPU_OUT)/pair \
		> $(GPU_OUT)/pair-eager.txt || { cat $(GPU_OUT)/pair-eager.txt; exit 1; }
	cat $(GPU_OUT)/pair-eager.txt
	$(BNEXP) run experiments/relu_lr1.yaml --device cuda --compile --force \
		--out $(GPU_OUT)/pair > $(GPU_OUT)/pair-compiled.txt \
		|| { cat $(GPU_OUT)/pair-compiled.txt; exit 1; }
	cat $(GPU_OUT)/pair-compiled.txt
	$(MAKE) test-gpu INSTALL='$(INSTALL)' PYTEST='$(PYTEST)'

test-gpu: $(INSTALL)
	$(PYTEST) -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
