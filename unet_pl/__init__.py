"""unet_pl: the Kaggle DSB 2018 Keras U-Net starter, rebuilt on PyTorch Lightning.

    from unet_pl import LitUNet, NucleiDataModule        # training (Lightning)
    from unet_pl import load_model, segment              # inference (no Lightning)
"""
import os

# albumentations asks the network for a newer release on import; training nodes are often offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .model import UNet  # noqa: E402

# Everything else loads on first use, so that `import unet_pl` stays light and prediction never
# imports Lightning.
_LAZY = {
    "LitUNet": ".lit", "NucleiDataModule": ".data.module",
    "segment": ".inference.predict", "probabilities": ".inference.predict", "Settings": ".inference.settings",
    "load_model": ".inference.checkpoint", "predict_folder": ".inference.folder",
    "load_keras_weights": ".keras.weights", "unet_from_keras": ".keras.weights",
}

__all__ = ["UNet", *_LAZY]
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
