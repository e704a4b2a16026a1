"""unet_pl: the Kaggle DSB 2018 Keras U-Net starter, rebuilt on PyTorch Lightning."""
from .lit import LitUNet
from .model import UNet

__all__ = ["UNet", "LitUNet"]
__version__ = "0.1.0"
