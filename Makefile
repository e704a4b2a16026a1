# Two commands do all the set-up:  `make train`  and  `make test`.
# Both create .venv on first use. TORCH is what pip installs for PyTorch (default torch==2.13.0;
# e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for the CPU-only
# build on a machine without a GPU). Giving another TORCH reinstalls; a later plain `make` keeps it.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
# A plain `make` (TORCH not given) keeps whatever TORCH the venv was installed with; giving TORCH
# (command line or environment) installs that one when it differs.
ifeq ($(origin TORCH),file)
EXISTING := $(firstword $(wildcard $(VENV)/.installed-*))
endif
STAMP  := $(or $(EXISTING),$(VENV)/.installed-$(shell echo '$(TORCH)' | md5sum | cut -c1-8))
ARGS   ?=

.PHONY: install train test bench clean segment pretrained crossval
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,tensorboard]"
	rm -f $(VENV)/.installed-*
	touch $@

# Without ARGS: the demo on the bundled 30-image sample. It has 2 batches an epoch, so it gets
# 150 epochs without early stopping (one to a few minutes on a CPU) to learn something worth looking at.
DEMO   := --epochs 150 --patience 0

train: install
	$(PY) scripts/train.py $(or $(ARGS),$(DEMO))

# The bundled pretrained model segments the bundled sample: label TIFFs, ROIs, tables, overlays.
segment: install
	$(PY) scripts/predict.py --data-dir unet_pl/sample/stage1_train --out-dir predictions/sample --rois --overlays

# Retrain the bundled model (docs/model-card.md): the recipe on the competition's training set
# without the stratified hold-out, then export weights + settings into the package.
DSB ?= ../shared/data/dsb2018/stage1_train
pretrained: install
	$(PY) scripts/train.py --gpus 0 --data-dir $(DSB) --holdout stratified --mode instance --epochs 100 --patience 10 --out runs/pretrained
	$(PY) -m unet_pl.cli.export --ckpt runs/pretrained/best.ckpt --out unet_pl/pretrained/dsb2018_instance.ckpt

# Grouped cross-validation of the recipe (docs/accuracy.md): 3 folds, whole acquisition groups
# held out; ARGS adds training flags. Three trainings on about 450 images each: 11-17 min each alone
# on a 2-core CPU (2026-12-01, fp32, with the weights' average most run all 100 epochs), plus 3-5 min
# of prediction per fold.
crossval: install
	$(PY) scripts/crossval.py --data-dir $(DSB) --out runs/cv_instance --predict "--tta d4 --min-size 20 --fill-holes --scale auto --split-concave" -- --gpus 0 --mode instance --epochs 100 --patience 10 $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
