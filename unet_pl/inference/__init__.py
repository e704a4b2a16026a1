"""Images out as nuclei: one inference path (``segment``), its settings, checkpoints, a folder loop.

Imports torch, numpy and scikit-image, never Lightning: prediction starts fast and the training
system (``unet_pl.lit``) can call it without a circle.
"""
from .checkpoint import load_model, read_checkpoint
from .predict import labels_from_probabilities, network_probabilities, predict_images, probabilities, segment
from .settings import Settings

__all__ = ["Settings", "labels_from_probabilities", "load_model", "network_probabilities", "predict_images",
           "probabilities", "read_checkpoint", "segment"]
