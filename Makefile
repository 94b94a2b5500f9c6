# make demo: set up (venv, packages, dataset) and train the default experiment.  make test: lint + tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup dataset demo lint format test benchmark clean

setup: $(STAMP) dataset

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dataset:
	@if [ -f $(FASHION_MNIST) ]; then \
		echo "Fashion-MNIST: $(dir $(FASHION_MNIST))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is not installed. Either run: sudo apt-get install -y dataset-fashion-mnist"; \
		echo "or, on a machine with internet, let torchvision download it on first use (data.download=true)."; \
	fi

demo: setup
	$(BIN)/lit-imgcls fit --config configs/fashion_mnist/lenet5.yaml --test_after_fit=true

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

benchmark: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf runs lightning_logs .pytest_cache
