"""The notebook's Keras world beside ours: its saved weights into our UNet (h5py only), and the seed's
Keras model itself (benchmark and parity reference; keras imported lazily)."""
from .weights import load_keras_weights, read_keras_convs, unet_from_keras

__all__ = ["load_keras_weights", "read_keras_convs", "unet_from_keras"]
