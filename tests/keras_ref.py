"""The reference: the seed's Keras model, built from the seed's code, on Keras 3's torch backend.

Import this module (not ``keras``) in tests: it selects the torch backend before Keras loads
(no TensorFlow needed) and skips the importing test module when Keras is missing.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"  # before the first `import keras`; Keras' default is TensorFlow
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras was already imported with the {keras.backend.backend()!r} backend", allow_module_level=True)

from keras import regularizers  # noqa: E402
from keras.layers import Conv2D, Conv2DTranspose, Input, Lambda, MaxPooling2D, concatenate  # noqa: E402
from keras.models import Model  # noqa: E402

#: Parameters of the seed network at 3 input channels (Keras' model.count_params()).
SEED_PARAMS = 485_817


def seed_model(img_size: int = 128, channels: int = 3, l2: float | None = None, logits: bool = False, seed: int = 0) -> Model:
    """``../shared/seed/keras-unet-question.txt``, line for line.

    ``l2``: the answer's ``kernel_regularizer=regularizers.l2(l2)`` on every Conv2D and
    Conv2DTranspose (head included). ``logits``: the head without its sigmoid, for a loss
    ``from_logits=True``. Glorot-uniform kernels from ``seed``, zero biases (Keras' defaults).
    """
    keras.utils.set_random_seed(seed)
    kw = {"kernel_regularizer": regularizers.l2(l2)} if l2 else {}
    IMG_HEIGHT = IMG_WIDTH = img_size
    IMG_CHANNELS = channels

    inputs = Input((IMG_HEIGHT, IMG_WIDTH, IMG_CHANNELS))
    s = Lambda(lambda x: x / 255)(inputs)

    c1 = Conv2D(8, (3, 3), activation="relu", padding="same", **kw)(s)
    c1 = Conv2D(8, (3, 3), activation="relu", padding="same", **kw)(c1)
    p1 = MaxPooling2D((2, 2))(c1)

    c2 = Conv2D(16, (3, 3), activation="relu", padding="same", **kw)(p1)
    c2 = Conv2D(16, (3, 3), activation="relu", padding="same", **kw)(c2)
    p2 = MaxPooling2D((2, 2))(c2)

    c3 = Conv2D(32, (3, 3), activation="relu", padding="same", **kw)(p2)
    c3 = Conv2D(32, (3, 3), activation="relu", padding="same", **kw)(c3)
    p3 = MaxPooling2D((2, 2))(c3)

    c4 = Conv2D(64, (3, 3), activation="relu", padding="same", **kw)(p3)
    c4 = Conv2D(64, (3, 3), activation="relu", padding="same", **kw)(c4)
    p4 = MaxPooling2D(pool_size=(2, 2))(c4)

    c5 = Conv2D(128, (3, 3), activation="relu", padding="same", **kw)(p4)
    c5 = Conv2D(128, (3, 3), activation="relu", padding="same", **kw)(c5)

    u6 = Conv2DTranspose(64, (2, 2), strides=(2, 2), padding="same", **kw)(c5)
    u6 = concatenate([u6, c4])
    c6 = Conv2D(64, (3, 3), activation="relu", padding="same", **kw)(u6)
    c6 = Conv2D(64, (3, 3), activation="relu", padding="same", **kw)(c6)

    u7 = Conv2DTranspose(32, (2, 2), strides=(2, 2), padding="same", **kw)(c6)
    u7 = concatenate([u7, c3])
    c7 = Conv2D(32, (3, 3), activation="relu", padding="same", **kw)(u7)
    c7 = Conv2D(32, (3, 3), activation="relu", padding="same", **kw)(c7)

    u8 = Conv2DTranspose(16, (2, 2), strides=(2, 2), padding="same", **kw)(c7)
    u8 = concatenate([u8, c2])
    c8 = Conv2D(16, (3, 3), activation="relu", padding="same", **kw)(u8)
    c8 = Conv2D(16, (3, 3), activation="relu", padding="same", **kw)(c8)

    u9 = Conv2DTranspose(8, (2, 2), strides=(2, 2), padding="same", **kw)(c8)
    u9 = concatenate([u9, c1], axis=3)
    c9 = Conv2D(8, (3, 3), activation="relu", padding="same", **kw)(u9)
    c9 = Conv2D(8, (3, 3), activation="relu", padding="same", **kw)(c9)

    outputs = Conv2D(1, (1, 1), activation=None if logits else "sigmoid", **kw)(c9)

    return Model(inputs=[inputs], outputs=[outputs])


def conv_layers(model: Model) -> list:
    """The Conv2D and Conv2DTranspose layers in the model's layer order."""
    return [layer for layer in model.layers if isinstance(layer, (Conv2D, Conv2DTranspose))]


def randomize_biases(model: Model, seed: int = 1, scale: float = 0.05) -> None:
    """Non-zero biases, so that a test notices a bias in the wrong place or decayed."""
    rng = np.random.default_rng(seed)
    for layer in conv_layers(model):
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, rng.uniform(-scale, scale, bias.shape).astype("float32")])


def write_keras2_h5(model: Model, path, with_config: bool = True) -> list[str]:
    """``model``'s weights in the layout Keras 2.x's ``ModelCheckpoint`` wrote for the notebook.

    ``/model_weights`` with byte-string attributes ``layer_names`` and per-layer
    ``weight_names`` (``conv2d_1/kernel:0``), datasets at ``model_weights/<layer>/<layer>/kernel:0``,
    Keras 2 names (counting from 1). ``with_config=False``: the ``save_weights`` layout (at the
    root, no ``model_config``). Returns the Keras 2 layer names, in order.
    """
    import h5py

    counters: dict[str, int] = {}
    names, configs = [], []
    for layer in model.layers:
        cls = type(layer).__name__
        prefix = {"InputLayer": "input", "MaxPooling2D": "max_pooling2d", "Concatenate": "concatenate",
                  "Conv2DTranspose": "conv2d_transpose"}.get(cls, cls.lower())
        counters[prefix] = counters.get(prefix, 0) + 1
        name = f"{prefix}_{counters[prefix]}"
        names.append(name)
        configs.append({"class_name": cls, "config": {"name": name}})
    with h5py.File(path, "w") as f:
        if with_config:
            f.attrs["keras_version"] = b"2.1.5"
            f.attrs["backend"] = b"tensorflow"
            f.attrs["model_config"] = json.dumps({"class_name": "Model", "config": {"layers": configs}}).encode()
            root = f.create_group("model_weights")
        else:
            root = f
        root.attrs["layer_names"] = np.array([n.encode() for n in names], dtype="S")  # Keras 2: fixed-length bytes
        for name, layer in zip(names, model.layers):
            group = root.create_group(name)
            weights = layer.get_weights()
            weight_names = [f"{name}/{w}:0" for w in ("kernel", "bias")[: len(weights)]]
            group.attrs["weight_names"] = np.array([w.encode() for w in weight_names], dtype="S")
            for w_name, value in zip(weight_names, weights):
                group.create_dataset(w_name, data=value)
    return names
