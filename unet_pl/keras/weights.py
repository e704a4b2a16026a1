"""Keras ``.h5`` weights -> ``UNet``, with h5py only (no TensorFlow, no Keras).

Three layouts are read:

- Keras 2 ``model.save`` / ``ModelCheckpoint`` (the notebook's ``model-dsbowl2018-1.h5``):
  ``/model_weights`` with a ``layer_names`` attribute (the model's layer order) and, per layer,
  a ``weight_names`` attribute naming datasets such as ``conv2d_1/kernel:0``.
  Keras 2 ``save_weights("x.h5")``: the same, at the file's root.
- Keras 3 legacy ``model.save("x.h5")`` / ``ModelCheckpoint("x.h5")``: the same layout, names
  without ``:0`` (``conv2d/kernel``).
- Keras 3 ``model.save_weights("x.weights.h5")``: ``/layers/<key>/vars/{0,1}`` (kernel, bias),
  keyed by class and position (``conv2d``, ``conv2d_1``, ...; ``conv2d_transpose``, ...), the
  layer's own name in ``vars.attrs["name"]``. That gives the order within each class; the two
  classes are interleaved as the UNet's own layers are.

Kernels are transposed to torch's layout: Conv2D ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)``;
Conv2DTranspose ``(kh, kw, out, in)`` -> ConvTranspose2d ``(in, out, kh, kw)``. No spatial flip:
both frameworks define the transposed convolution as the gradient of the same correlation
(``tests/test_keras_parity.py`` checks outputs against Keras).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model import UNet, conv_layers

log = logging.getLogger(__name__)


@dataclass
class KerasConv:
    """One Keras convolution layer read from a file. ``kernel`` in Keras' layout ``(kh, kw, a, b)``."""

    name: str
    kernel: np.ndarray
    bias: np.ndarray | None
    transposed: bool | None  # None: the file does not say


def read_keras_convs(path: str | Path) -> tuple[list[KerasConv], bool]:
    """The convolution layers of a Keras ``.h5`` file and whether the file gives their order.

    Ordered (the ``.h5`` layouts): the model's layer order. Unordered (``.weights.h5``): every
    Conv2D in the model's order, then every Conv2DTranspose in the model's order.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Keras weights file at {path}")
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs or "layer_names0" in f.attrs:
                return _read_legacy(f, f, _layer_classes(f)), True
            if "model_weights" in f:
                return _read_legacy(f, f["model_weights"], _layer_classes(f)), True
            if "layers" in f:
                return _read_weights_h5(f["layers"], path), False
    except (OSError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, ValueError) as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise  # our own message about this file's layers
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path}: not a readable Keras .h5 file ({first}); pass the file the notebook's "
                         "model.save('model-dsbowl2018-1.h5') wrote") from None
    raise ValueError(
        f"{path} is not a Keras weights file: it has no 'model_weights' group, no 'layer_names' "
        f"attribute and no 'layers' group (save it with model.save('x.h5') or model.save_weights('x.weights.h5'))"
    )


def load_keras_weights(unet: nn.Module, path: str | Path) -> nn.Module:
    """Copy the Conv2D/Conv2DTranspose weights of a Keras ``.h5`` file into ``unet`` (in place).

    The file's convolutions, in the model's layer order, map one to one onto
    ``unet_pl.model.conv_layers(unet)``. Raises ``ValueError`` naming the first layer whose
    shape does not fit (expected vs got, in Keras' layout), or when the counts differ.
    Returns ``unet``. ``unet`` expects images in [0, 1]: the seed's ``Lambda(x / 255)`` is not a weight.
    """
    convs, ordered = read_keras_convs(path)
    modules = conv_layers(unet)
    names = {id(m): n for n, m in unet.named_modules()}
    if not ordered:
        convs = _interleave(convs, modules)
    elif any(c.transposed is None for c in convs):
        for conv, m in zip(convs, modules):  # the file does not say which are transposed: shapes check it
            conv.transposed = isinstance(m, nn.ConvTranspose2d)
    tensors = []
    for conv, m in zip(convs, modules):
        transposed = isinstance(m, nn.ConvTranspose2d)
        kind = "Conv2DTranspose" if transposed else "Conv2D"
        if conv.transposed is not None and conv.transposed != transposed:
            got = "Conv2DTranspose" if conv.transposed else "Conv2D"
            raise ValueError(f"layer {conv.name!r} in {path} is a {got}, but the UNet expects a {kind} there ({names[id(m)]})")
        want = tuple(m.weight.shape[i] for i in (2, 3, 1, 0))  # Keras' (kh, kw, in|out, out|in)
        if tuple(conv.kernel.shape) != want:
            raise ValueError(
                f"layer {conv.name!r} in {path} does not fit the UNet's {kind} {names[id(m)]!r}: "
                f"expected kernel shape {want}, got {tuple(conv.kernel.shape)}"
            )
        bias = conv.bias if conv.bias is not None else np.zeros(tuple(m.bias.shape), dtype=np.float32)  # use_bias=False
        if tuple(bias.shape) != tuple(m.bias.shape):
            raise ValueError(
                f"layer {conv.name!r} in {path} does not fit the UNet's {kind} {names[id(m)]!r}: "
                f"expected bias shape {tuple(m.bias.shape)}, got {tuple(bias.shape)}"
            )
        tensors.append((m, torch.from_numpy(np.ascontiguousarray(conv.kernel.transpose(3, 2, 0, 1))), torch.from_numpy(bias)))
    if len(convs) != len(modules):
        raise ValueError(
            f"{path} holds {len(convs)} convolution layers but the UNet has {len(modules)}: "
            f"not the seed's topology (or built with other base_filters/levels)"
        )
    with torch.no_grad():  # copy only once every layer fits: a failed import leaves unet untouched
        for m, w, b in tensors:
            m.weight.copy_(w)
            m.bias.copy_(b)
    log.info("loaded %d Keras convolution layers from %s", len(tensors), path)
    return unet


def unet_from_keras(path: str | Path) -> UNet:
    """A ``UNet`` shaped like the Keras file (in/out channels, base filters) with its weights."""
    convs, _ = read_keras_convs(path)
    plain = [c for c in convs if not c.transposed]
    if not plain:
        raise ValueError(f"{path} holds no Conv2D layers")
    first, last = plain[0].kernel.shape, plain[-1].kernel.shape  # the first level, the 1x1 head
    net = UNet(in_channels=first[2], out_channels=last[3], base_filters=first[3])
    return load_keras_weights(net, path)


# --- the file layouts -------------------------------------------------------------------------


def _attr_list(group, name: str) -> list[str]:
    """A string-list attribute, Keras-2 style: possibly split into ``name0``, ``name1``, ... chunks."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values.extend(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _layer_classes(f) -> dict[str, str]:
    """Layer name -> Keras class name, from the ``model_config`` attribute when the file has one."""
    import json

    raw = f.attrs.get("model_config")
    if raw is None:
        return {}
    config = json.loads(raw.decode("utf8") if isinstance(raw, bytes) else raw)
    layers = config.get("config", {}).get("layers", [])
    return {layer.get("config", {}).get("name", layer.get("name")): layer.get("class_name") for layer in layers}


def _kind(weight_name: str) -> str:
    """``conv2d_1/kernel:0`` -> ``kernel``."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _read_legacy(f, root, classes: dict[str, str]) -> list[KerasConv]:
    convs = []
    for layer in _attr_list(root, "layer_names"):
        group = root[layer]
        weights = {_kind(w): np.asarray(group[w], dtype=np.float32) for w in _attr_list(group, "weight_names")}
        if not weights:
            continue  # Input, Lambda, MaxPooling2D, concatenate
        if "kernel" not in weights or weights["kernel"].ndim != 4:
            raise ValueError(
                f"layer {layer!r} in {f.filename} has weights {sorted(weights)} but is not a 2-D convolution: "
                f"the UNet holds only Conv2D and Conv2DTranspose layers"
            )
        cls = classes.get(layer)
        transposed = None if cls is None else cls == "Conv2DTranspose"
        if transposed is None and "transpose" in layer:
            transposed = True
        convs.append(KerasConv(layer, weights["kernel"], weights.get("bias"), transposed))
    if any(c.transposed for c in convs):
        for c in convs:  # no model_config, but names say "transpose": the rest are plain convolutions
            c.transposed = bool(c.transposed)
    return convs


#: ``.weights.h5`` keys a model's layers by class and position: ``conv2d``, ``conv2d_1``, ... in
#: ``model.layers`` order, whatever the layers' own names (those sit in ``vars.attrs["name"]``).
_CLASS_KEY = re.compile(r"^(.*?)(?:_(\d+))?$")


def _read_weights_h5(layers, path: Path) -> list[KerasConv]:
    """Keras 3 ``.weights.h5``: ``layers/<class key>/vars/0`` kernel, ``vars/1`` bias."""
    convs = []
    for key in layers:
        vars_ = layers[key].get("vars")
        if vars_ is None or len(vars_) == 0:
            continue  # input_layer, lambda, max_pooling2d, concatenate
        name = vars_.attrs.get("name", key)
        name = name.decode("utf8") if isinstance(name, bytes) else str(name)
        kernel = np.asarray(vars_["0"], dtype=np.float32)
        cls, index = _CLASS_KEY.match(key).groups()
        if cls not in ("conv2d", "conv2d_transpose") or kernel.ndim != 4:
            raise ValueError(
                f"layer {name!r} ({key}) in {path} holds a weight of shape {kernel.shape} and is not a Conv2D or "
                f"Conv2DTranspose: the UNet holds only those"
            )
        bias = np.asarray(vars_["1"], dtype=np.float32) if "1" in vars_ else None
        convs.append(((cls == "conv2d_transpose", int(index or 0)), KerasConv(name, kernel, bias, cls == "conv2d_transpose")))
    convs.sort(key=lambda item: item[0])
    return [conv for _, conv in convs]


def _interleave(convs: list[KerasConv], modules: list[nn.Module]) -> list[KerasConv]:
    """``.weights.h5``: Conv2Ds in model order and Conv2DTransposes in model order, merged as the UNet's."""
    queues = {False: [c for c in convs if not c.transposed], True: [c for c in convs if c.transposed]}
    merged = []
    for m in modules:
        queue = queues[isinstance(m, nn.ConvTranspose2d)]
        if queue:
            merged.append(queue.pop(0))
    return merged + queues[False] + queues[True]  # leftovers make the count check fail
