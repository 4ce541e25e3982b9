# Set-up and the two jobs of README: `make demo` (main job) and `make test` (test suite).
# Everything is installed into .venv; the dataset comes from Debian's dataset-fashion-mnist.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
# torch/torchvision are pinned to the builds this project is tested with (on the team's
# machines they install from local disk); override TORCH= to use another build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup data browser demo test docs lint bench gpu-check clean

$(BIN)/robustse: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))" \
		| xargs -d '\n' $(BIN)/pip install --quiet
	touch $@

setup: $(BIN)/robustse data

data:
	@if [ -n "$$ROBUSTSE_DATA" ] || [ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or set" \
		     "ROBUSTSE_DATA to a folder holding the four IDX .gz files" >&2; exit 1; \
	fi

# Headless Chromium renders the HTML report in the test suite (Debian package chromium).
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
		echo "chromium: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "chromium is missing: run 'sudo apt-get install chromium' (the report test renders in it)" >&2; exit 1; \
	fi

demo: setup
	$(BIN)/robustse experiment --spec attacks/quick.toml

# two workers, one thread each (tests/conftest.py): both cores busy through the subprocess-heavy tests
test: setup browser
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The manual (docs/, mkdocs.yml) as a static site in site/; --strict fails on a broken link or page.
docs: setup
	$(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check robustse tests benchmarks cli.py
	$(BIN)/mypy robustse
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/layout_speed.py
	$(BIN)/python benchmarks/attack_engine.py
	$(BIN)/python benchmarks/capture_overhead.py
	$(BIN)/python benchmarks/sweep_throughput.py
	$(BIN)/python benchmarks/probe_memory.py

# On a machine with a GPU: the CUDA tests, then the throughput benchmarks on the GPU, one summary.
gpu-check: setup
	$(BIN)/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
	$(BIN)/python -m pytest -q -m cuda tests/test_cuda.py
	$(BIN)/python benchmarks/seed_batching.py --device cuda --ks 1,6,12
	$(BIN)/python benchmarks/sweep_throughput.py --device cuda
	$(BIN)/python benchmarks/compile_speed.py --device cuda
	$(BIN)/python benchmarks/layout_speed.py --device cuda

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
