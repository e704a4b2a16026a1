"""The one way from an image to nuclei: ``segment(net, image)``.

Every caller goes through here: ``predict.py`` (a loop over a folder), ``LitUNet``'s validation
score and ``predict_step``, ``val_predictions.png`` and the tuning of the post-processing. The
functions take a network (any ``nn.Module`` mapping float images ``(N, 3, H, W)`` in [0, 1] to
logits, e.g. ``UNet`` or ``LitUNet``) and its ``Settings``; nothing here imports Lightning.

    image file path, or uint8/uint16 (H, W[, C])   read as predict.py reads it (``read_raw``), or a file's pixels
      -> uint8 (H, W, 3)                        the channel and intensity rule of the settings (check_image)
      -> network input float32 (1, 3, h, w)    resize: the notebook's squash to img_size squares;
                                                native: the image itself, padded to a multiple of 16
      -> probabilities float (C, H, W)          sigmoid, TTA views averaged, tiles stitched,
                                                resized back to the image's size (resize mode)
      -> labels int32 (H, W)                    components or watershed, holes, minimum size

``predict_images`` is the same path for many images: resized images go through in batches.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.readers import read_raw, to_rgb8
from ..geometry import resize_back, resize_image
from ..precision import autocast as precision_autocast
from .postprocess import probabilities_to_labels
from .scale import CERTAINTY_FACTORS, auto_factor, certainty, resize, scaled_size
from .settings import Settings
from .tiling import predict_whole
from .tta import tta_predict


def settings_of(net: nn.Module, settings: Settings | None = None, **overrides: Any) -> Settings:
    """``settings``, else the network's own (``net.settings``, as ``LitUNet`` has), else the defaults; then ``overrides``."""
    if settings is None:
        settings = getattr(net, "settings", None) or Settings()
    return settings.replace(**overrides)


#: An array with at most this many planes along its first axis and more along its last is channels first.
MAX_CHANNELS = 8


def check_image(image: np.ndarray | str | Path, settings: Settings) -> np.ndarray:
    """An image file (read with ``read_raw`` and ``settings.channel``, as predict.py reads it) or an
    array as a file's pixels -> uint8 ``(H, W, 3)`` for the network, read as in training: uint8 or
    uint16, ``(H, W)``, ``(H, W, 1)``, RGB, RGBA or ``(H, W, C)`` with ``settings.channel`` picking
    the nuclear channel, then ``settings.intensity`` (``unet_pl.data.readers.to_rgb8``). Anything
    else is a ``ValueError`` that says how to get there."""
    if isinstance(image, (list, tuple)):
        raise ValueError(f"one image at a time (a file's path or its pixels), got a {type(image).__name__} of {len(image)}; "
                         "for several: [segment(net, image) for image in images], or "
                         "unet_pl.inference.predict_images(net, images, settings) for their probability maps")
    if isinstance(image, (str, Path)):
        image = read_raw(image, settings.channel)
    image = np.asarray(image)
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"images go into the network as uint8 or uint16 (H, W[, C]) pixels, got {image.dtype} {image.shape}; "
                         "pass the file's path, or its pixels as unet_pl.data.readers.read_raw returns them")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected one image (H, W) or (H, W, C), got shape {image.shape}")
    if image.shape[0] <= MAX_CHANNELS < image.shape[2]:
        raise ValueError(f"the array's shape {image.shape} is channels first (C, H, W), as tifffile.imread returns a "
                         "hyperstack; pass np.moveaxis(image, 0, -1), which is (H, W, C), or the file's path (with "
                         "channel=N for the nuclear channel). A stack of separate images is not one image: segment each")
    n = image.shape[2]
    if settings.channel is not None and n > 1:
        if settings.channel > n:
            raise ValueError(f"the image has {n} channels; channel must be 1 to {n}, got {settings.channel}")
        image = image[:, :, settings.channel - 1:settings.channel]
    elif n == 4:
        image = image[:, :, :3]  # RGBA: alpha dropped, as the readers do
    elif n not in (1, 3):
        raise ValueError(f"the image has {n} channels; pick the nuclear one with channel=N (1 to {n})")
    if image.dtype == np.uint8 and image.shape[2] == 3 and settings.intensity == "fixed":
        return np.ascontiguousarray(image)
    return to_rgb8(image, settings.intensity, background=settings.background)


def to_input(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None,
             channels_last: bool = True) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` or ``(N, H, W, 3)`` arrays, or a uint8 ``(N, 3, H, W)`` tensor -> float32
    ``(N, 3, H, W)`` in [0, 1] on ``device`` (default: where it is), channels-last unless told
    otherwise (the seed's ``Lambda(x / 255)``). Only uint8 crosses to the device; float tensors
    are taken as already scaled."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        x = (x[None] if x.ndim == 3 else x).permute(0, 3, 1, 2)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def network_probabilities(net: nn.Module, x: torch.Tensor, tta: str = "none", precision: str = "auto") -> torch.Tensor:
    """``sigmoid(net(view))`` averaged over the TTA views: float32 ``(N, C, H, W)``. ``x`` as ``to_input`` makes it.
    ``precision``: the network's arithmetic (``Settings.precision``: "auto", "32" or "bf16"); "auto" inside a
    caller's own autocast (Lightning's ``trainer.predict`` with ``bf16-mixed``) leaves it as it is."""
    keep = precision == "auto" and torch.is_autocast_enabled(x.device.type)
    with contextlib.nullcontext() if keep else precision_autocast(precision, x.device):
        # A rotated or flipped view is a strided copy; the network runs fastest on channels-last input.
        return tta_predict(lambda v: net(v.contiguous(memory_format=torch.channels_last)).float().sigmoid_(), x, tta)


def _device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def probabilities(net: nn.Module, image: np.ndarray | str | Path, settings: Settings | None = None,
                  **overrides: Any) -> np.ndarray:
    """One image (a file's path or its pixels, see ``check_image``) -> probabilities float ``(C, H, W)`` in [0, 1] at its own size."""
    return next(predict_images(net, [image], settings_of(net, settings, **overrides)))


def labels_from_probabilities(prob: np.ndarray, settings: Settings) -> np.ndarray:
    """Probabilities ``(C, H, W)`` -> int32 nuclei ``(H, W)`` with ``settings``' post-processing."""
    return probabilities_to_labels(prob, settings.threshold, split=settings.split, seed_threshold=settings.seed_threshold,
                                   min_size=settings.min_size, holes=settings.fill_holes,
                                   min_relative_size=settings.min_relative_size, min_probability=settings.min_probability,
                                   concave=settings.split_concave)


def segment(net: nn.Module, image: np.ndarray | str | Path, settings: Settings | None = None,
            **overrides: Any) -> np.ndarray:
    """One image, any size (a file's path, or its pixels as ``read_raw`` returns them: the model's
    channel and intensity rule are applied here, see ``check_image``) -> nuclei int32 ``(H, W)``: 0 background, 1..k one per nucleus.

    ``settings``: how the network was trained and how to post-process (default: ``net.settings``
    where the network has them, as a ``LitUNet`` or ``unet_pl.load_model``'s does; else the
    notebook's). Keyword overrides replace single settings: ``segment(net, im, tta="d4", min_size=20)``.
    """
    s = settings_of(net, settings, **overrides)
    return labels_from_probabilities(probabilities(net, image, s), s)


def predict_images(net: nn.Module, images: Iterable[np.ndarray], settings: Settings, batch_size: int = 8) -> Iterator[np.ndarray]:
    """Probabilities ``(C, H, W)`` for each image of ``images`` (each a file's path or its pixels, as
    ``segment`` takes them: ``check_image``), in order; ``labels_from_probabilities`` makes nuclei of each.

    Resize mode: images are squashed to ``img_size`` squares and run ``batch_size`` at a time,
    each result resized back to its image's size. Native mode: one image at a time, whole
    (padded to a multiple of 16) or in overlapping tiles above ``settings.tile``, resized by
    ``settings.scale`` first and back after (``unet_pl.inference.scale``).
    """
    return (prob for prob, _ in predict_scaled(net, images, settings, batch_size))


@torch.inference_mode()
def predict_scaled(net: nn.Module, images: Iterable[np.ndarray], settings: Settings,
                   batch_size: int = 8) -> Iterator[tuple[np.ndarray, float | None]]:
    """``predict_images`` with the factor each image was resized by before the network: ``(probabilities,
    factor)``; the factor is ``settings.scale``'s (the one chosen for the image with "auto" or
    "certainty"), None for resize-mode models (squashed to ``img_size`` squares, not scaled)."""
    device = _device(net)
    images = (check_image(image, settings) for image in images)
    if settings.resolution == "native":
        def at(x: torch.Tensor, factor: float, tta: str) -> torch.Tensor:
            """Probabilities of ``x`` resized by ``factor``, back at its size."""
            size = tuple(x.shape[-2:])
            small = x if factor == 1.0 else resize(x, scaled_size(size, factor))
            prob = predict_whole(lambda v: network_probabilities(net, v, tta, settings.precision), small, tile=settings.tile,
                                 prepare=lambda t: to_input(t, device))
            return resize(prob, size)

        for image in images:
            # uint8 until a batch of tiles goes in: a 16k x 16k image is 0.8 GB as uint8, 3.2 GB as float
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
            if settings.scale == "certainty":
                # one pass per factor without TTA; keep the surest (a tie keeps the first: 1.0)
                prob, best, sure = None, 1.0, -1.0
                for factor in CERTAINTY_FACTORS:
                    view = at(x, factor, "none")
                    if (c := certainty(view)) > sure:
                        prob, best, sure = view, factor, c
                if settings.tta != "none":
                    prob = None  # freed before the pass with TTA
                    prob = at(x, best, settings.tta)
            else:
                auto = settings.scale == "auto"
                factor = 1.0 if auto else float(settings.scale)
                prob = at(x, factor, "none" if auto else settings.tta)
                if auto:  # the first pass, one view, measures the nuclei
                    factor = auto_factor(labels_from_probabilities(prob[0].cpu().numpy(), settings))
                    if factor != 1.0 or settings.tta != "none":
                        prob = None  # freed before the second pass
                        prob = at(x, factor, settings.tta)
            # (C, H, W) in order: the network's channels-last output would leave every later pass striding
            yield prob[0].cpu().contiguous().numpy(), (best if settings.scale == "certainty" else factor)
        return
    batch: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []

    def flush() -> Iterator[np.ndarray]:
        prob = network_probabilities(net, to_input(np.stack(batch), device), settings.tta, settings.precision).cpu().numpy()
        for p, size in zip(prob, sizes, strict=True):
            yield resize_back(p, size), None
        batch.clear()
        sizes.clear()

    for image in images:
        batch.append(resize_image(image, settings.img_size))
        sizes.append(image.shape[:2])
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()
