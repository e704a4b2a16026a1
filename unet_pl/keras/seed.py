"""The seed notebook's Keras U-Net, written from its code (the reference for parity and speed).

Imports keras lazily: keras is a test/benchmark extra, never a runtime dependency.
``build_seed_model(size, l2=None)`` returns the notebook's uncompiled ``keras.Model`` taking uint8-range
images ``(N, size, size, 3)``; with ``l2`` set, every Conv2D and Conv2DTranspose kernel gets
``kernel_regularizer=regularizers.l2(l2)`` (the answer to the seed's question).
"""
from __future__ import annotations


def build_seed_model(size: int = 128, channels: int = 3, l2: float | None = None):
    from keras import Model, layers, regularizers

    reg = {"kernel_regularizer": regularizers.l2(l2)} if l2 else {}

    def conv(n, x):
        return layers.Conv2D(n, (3, 3), activation="relu", padding="same", **reg)(x)

    def up(n, x):
        return layers.Conv2DTranspose(n, (2, 2), strides=(2, 2), padding="same", **reg)(x)

    inputs = layers.Input((size, size, channels))
    s = layers.Rescaling(1.0 / 255)(inputs)  # the seed's Lambda(lambda x: x / 255)
    c1 = conv(8, conv(8, s))
    c2 = conv(16, conv(16, layers.MaxPooling2D((2, 2))(c1)))
    c3 = conv(32, conv(32, layers.MaxPooling2D((2, 2))(c2)))
    c4 = conv(64, conv(64, layers.MaxPooling2D((2, 2))(c3)))
    c5 = conv(128, conv(128, layers.MaxPooling2D((2, 2))(c4)))
    c6 = conv(64, conv(64, layers.concatenate([up(64, c5), c4])))
    c7 = conv(32, conv(32, layers.concatenate([up(32, c6), c3])))
    c8 = conv(16, conv(16, layers.concatenate([up(16, c7), c2])))
    c9 = conv(8, conv(8, layers.concatenate([up(8, c8), c1], axis=3)))
    outputs = layers.Conv2D(1, (1, 1), activation="sigmoid", **reg)(c9)
    return Model(inputs=[inputs], outputs=[outputs])
