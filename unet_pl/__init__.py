"""unet_pl: the Kaggle DSB 2018 Keras U-Net starter, rebuilt on PyTorch Lightning."""
import os

# albumentations asks the network for a newer release on import; training nodes are often offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .keras_import import load_keras_weights, unet_from_keras
from .model import UNet

# Lightning-backed names load on first use, so that `import unet_pl.model` (pure torch) stays light.
_LAZY = {"LitUNet": ".lit", "NucleiDataModule": ".data", "NativeNucleiDataModule": ".native_data"}

__all__ = ["UNet", "LitUNet", "NucleiDataModule", "NativeNucleiDataModule", "load_keras_weights", "unet_from_keras"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
