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

train: install
	$(PY) scripts/train.py $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
