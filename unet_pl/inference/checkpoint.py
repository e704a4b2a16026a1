"""Checkpoints in, networks out, without Lightning and without running code from the file.

``load_model(path)`` reads a ``LitUNet`` checkpoint (``best.ckpt``, ``last.ckpt``) with
``torch.load(weights_only=True)``: tensors and plain Python values only, so a crafted pickle
cannot execute anything. It returns the seed's ``UNet`` with the checkpoint's weights and its
``Settings`` attached as ``net.settings``, which ``segment`` and ``predict.py`` use by default.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..model import UNet
from .settings import Settings

log = logging.getLogger(__name__)

#: The bundled pretrained model (docs/model-card.md): weights and settings, no optimizer state.
PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "dsb2018_instance.ckpt"
#: What an exported checkpoint keeps: enough for load_model and LitUNet.load_from_checkpoint.
EXPORT_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "pytorch-lightning_version", "NucleiDataModule", "epoch",
               "global_step")

#: What a bad checkpoint file raises inside torch.load.
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, KeyError, TypeError,
               AttributeError, IndexError, zipfile.BadZipFile, UnicodeDecodeError)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """The checkpoint's dict, loaded with ``weights_only=True``; ``ValueError`` naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the checkpoint in it, e.g. {path / 'best.ckpt'}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass a run's best.ckpt or last.ckpt")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
        raise ValueError(f"{path}: not a checkpoint file (torch.save writes a zip archive); pass a run's best.ckpt or "
                         "last.ckpt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        blocked = next((line for line in lines if "unsupported" in line.lower() and "global" in line.lower()), None)
        blocked = blocked or (lines[0] if "Weights only load failed" in str(e) else None)
        why = (f"it holds code or objects other than weights and plain settings: refused, nothing in it was run; "
               f"{blocked[:100]}" if blocked else
               f"damaged or truncated: {(lines or [type(e).__name__])[0][:120]}")
        raise ValueError(f"{path}: not a readable unet_pl checkpoint ({why}); use a best.ckpt or last.ckpt that train.py "
                         "wrote") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict); use a best.ckpt or last.ckpt that train.py wrote")
    return ckpt


def unet_state_dict(ckpt: dict) -> dict:
    """The U-Net's weights of a LitUNet checkpoint dict, named as ``UNet`` names them (without the
    module's ``unet.`` prefix and a ``--compile`` run's ``_orig_mod.``)."""
    return {k.removeprefix("unet.").replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items()
            if k.startswith("unet.")}


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> UNet:
    """The ``UNet`` of a checkpoint dict (``read_checkpoint``), with ``net.settings`` from its hyperparameters."""
    try:
        hp = dict(ckpt.get("hyper_parameters") or {})
        settings = Settings.from_hparams(hp)
        net = UNet(int(hp.get("in_channels", 3)), settings.out_channels, int(hp.get("base_filters", 8)))
        net.load_state_dict(unet_state_dict(ckpt))
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path}: its settings or weights do not fit the seed's U-Net ({first}); use a best.ckpt or "
                         "last.ckpt that train.py wrote") from None
    net.settings = settings
    return net


def load_model(ckpt: str | Path | dict | None = None, keras_h5: str | Path | None = None,
               device: torch.device | str = "cpu", name: str | Path | None = None) -> UNet:
    """A network ready for ``segment``: eval mode, channels-last, on ``device``, ``net.settings`` attached.

    ``ckpt``: a LitUNet checkpoint (a path, or the dict ``read_checkpoint`` returned);
    ``keras_h5``: the notebook's saved Keras model (its settings: the notebook's, 128 px squares).
    Neither: the bundled pretrained model (``PRETRAINED``). ``name``: what errors call a checkpoint
    given as a dict (its file).

    On the CPU it first turns on ``unet_pl.perf.keep_freed_memory`` (prediction turns it on anyway):
    glibc must be told before the model's first parallel operation starts threads that take memory
    pools of their own, or the prediction threads share those pools, whose freed memory goes back
    to the system and is faulted in again (a 2048 x 2048 folder ran 20% slower that way). The
    setting is process-wide and stays (``predict_folder(keep_memory=False)`` does not undo it);
    the environment variable ``UNET_PL_KEEP_FREED_MEMORY=0`` keeps it off.
    """
    if torch.device(device).type == "cpu":
        from ..perf import keep_freed_memory

        keep_freed_memory()
    if ckpt is not None and keras_h5 is not None:
        raise ValueError("give one of a checkpoint (--ckpt) or a Keras .h5 (--keras-h5), not both")
    if ckpt is None and keras_h5 is None:
        ckpt = PRETRAINED
    if ckpt is not None:
        if isinstance(ckpt, dict):
            net = model_from_checkpoint(ckpt, name or "checkpoint")
        else:
            net = model_from_checkpoint(read_checkpoint(ckpt), ckpt)
    else:
        from ..keras import unet_from_keras  # needs h5py; only this path does

        if not Path(keras_h5).is_file():
            raise FileNotFoundError(f"{keras_h5}: no such file; pass the notebook's saved model (model-dsbowl2018-1.h5)")
        net = unet_from_keras(keras_h5)
        net.settings = Settings()
    return net.to(device, memory_format=torch.channels_last).eval()


def update_hyperparameters(path: str | Path, **values: Any) -> None:
    """Set ``values`` in a checkpoint file's ``hyper_parameters``, replacing the file whole (temp + rename)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    ckpt.setdefault("hyper_parameters", {}).update(values)
    save_atomically(ckpt, path)


def export_model(ckpt: str | Path, out: str | Path) -> Path:
    """A training checkpoint -> a small one for sharing: weights, settings, the held-out ids; no
    optimizer or loop state (``EXPORT_KEYS``). Loads with ``load_model`` and ``LitUNet.load_from_checkpoint``."""
    full = read_checkpoint(ckpt)
    model_from_checkpoint(full, ckpt)  # it must be a model we can load
    small = {k: full[k] for k in EXPORT_KEYS if k in full}
    small["state_dict"] = {k: v.float().contiguous() for k, v in small["state_dict"].items()}
    return save_atomically(small, Path(out))


def save_atomically(obj: dict, path: Path) -> Path:
    """``torch.save`` replacing ``path`` whole (``unet_pl.atomic``): never half a checkpoint."""
    from ..atomic import atomic_write

    return atomic_write(path, lambda f: torch.save(obj, f))
