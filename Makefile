# Two commands for a fresh machine: `make demo` and `make test`. Each creates (or
# reuses) the project-local virtual environment .venv, installs what is missing,
# then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DATA_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.megabatch-installed

.PHONY: demo test install data clean

demo: install data
	$(VENV)/bin/megabatch train --recipe fashion-mnist-demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install data
	$(PY) -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard src/megabatch/csrc/*.cpp)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || { \
	  echo "installing $(TORCH_PINS) into $(VENV)"; \
	  $(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PINS); }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@$(PY) -m megabatch.kernels || echo "megabatch: running without its C++ kernel (ghost BN slower on several threads)"
	@touch $@

data:
	@if [ -d $(DATA_DIR) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the Debian package dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing from $(DATA_DIR): run 'sudo apt-get install dataset-fashion-mnist'" \
	       "(Debian/Ubuntu), or put the four idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz," \
	       "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder and pass --data DIR" >&2; \
	  exit 2; \
	fi

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
