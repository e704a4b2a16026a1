# Two commands do all the set-up:  `make train`  and  `make test`.
# Both create .venv on first use. TORCH picks the torch build: the default is the CPU wheel;
# on a CUDA machine use e.g. `make train TORCH=torch` (a CUDA build from PyPI).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: install train test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,tensorboard]"
	touch $@

# Without ARGS: the demo on the bundled 30-image sample. It has 2 batches an epoch, so it gets
# 150 epochs without early stopping (about 30 s on a CPU) to learn something worth looking at.
DEMO   := --epochs 150 --patience 0

train: install
	$(PY) scripts/train.py $(or $(ARGS),$(DEMO))

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
