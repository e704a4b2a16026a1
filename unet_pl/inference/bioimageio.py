"""A checkpoint as a BioImage Model Zoo (bioimage.io) package: what ilastik, deepImageJ, QuPath's
extension and bioimageio.core run. Optional (``pip install -e ".[bioimageio]"`` to validate).

The package folder holds ``rdf.yaml`` (format 0.5), ``weights.pt`` (the UNet's ``state_dict``),
``unet.py`` (the architecture: this project's ``unet_pl/model.py``, torch only), test tensors
(a 256 x 256 crop of a bundled sample image and the probabilities the model gives it), a cover
and a README. The input is ``(batch, channel RGB, y, x)`` float32 with y and x multiples of 16;
preprocessing is the model's intensity rule in the spec's own terms (``scale_linear`` 1/255 for
"fixed", ``scale_range`` 1st-99.8th percentile for "percentile"); "grey" inverts bright backgrounds
per image, which the spec's steps cannot say, so its package declares none and its architecture
is ``GreyUNet`` (``unet_pl/model.py``), which reads raw values as unet_pl does; the output is the sigmoid of the
network, the foreground (and boundary) probabilities. The resize of resize-mode models and our
watershed are not part of the package: consumers see the network.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch

from ..model import GreyUNet, UNet
from .settings import Settings

EPS = 1e-6  # the spec's scale_range epsilon


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def preprocess(image: np.ndarray, settings: Settings) -> np.ndarray:
    """uint8/float ``(1, 3, H, W)`` -> float32 the way the package's ``preprocessing`` declares it
    ("grey": none; ``GreyUNet`` reads the raw values)."""
    x = image.astype(np.float32)
    if settings.intensity == "grey":
        return x
    if settings.intensity == "percentile":
        lo, hi = np.percentile(x, [1.0, 99.8])
        return ((x - lo) / (hi - lo + EPS)).astype(np.float32)
    return x / 255.0


def export_bioimageio(net: UNet, out_dir: str | Path, name: str = "unet_pl DSB2018 nuclei",
                      test_image: np.ndarray | None = None) -> Path:
    """Write the package for ``net`` (with ``net.settings``) into ``out_dir``; returns its ``rdf.yaml``."""
    import yaml

    from ..data import SAMPLE_DIR
    from ..data.readers import read_raw

    s: Settings = net.settings
    if s.intensity not in ("fixed", "percentile", "grey"):
        raise ValueError(f"the model reads images with intensity {s.intensity!r} (colour deconvolution), which a "
                         "bioimage.io package cannot express; export it as a checkpoint instead "
                         "(export.py without --bioimageio)")
    if s.background != "auto":
        raise ValueError(f"background {s.background}: a bioimage.io package decides the grey rule's inversion per image, "
                         "as in training; export the model's own settings (background auto)")
    grey = s.intensity == "grey"
    arch = GreyUNet if grey else UNet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "model.py", out / "unet.py")
    state = {k: v.detach().cpu().contiguous(memory_format=torch.contiguous_format) for k, v in net.state_dict().items()}
    torch.save(state, out / "weights.pt")
    if test_image is None:
        path = sorted(SAMPLE_DIR.glob("*/images/*.png"))[0]
        test_image = read_raw(path, s.channel)
    raw = np.asarray(test_image)[:256, :256]
    raw = np.repeat(raw, 3, axis=2) if raw.shape[2] == 1 else raw[..., :3]
    x = raw.transpose(2, 0, 1)[None].astype(np.float32)
    np.save(out / "test_input.npy", x)
    plain = arch(net.in_channels, net.out_channels, 8)
    plain.load_state_dict(state)
    with torch.inference_mode():
        y = torch.sigmoid(plain.eval()(torch.from_numpy(preprocess(x, s)))).numpy()
    np.save(out / "test_output.npy", y.astype(np.float32))
    import tifffile

    tifffile.imwrite(out / "sample_input.tif", raw)
    tifffile.imwrite(out / "sample_output.tif", y[0].astype(np.float32))
    _cover(raw, y[0, 0], out / "cover.png")
    (out / "README.md").write_text(
        f"# {name}\n\nThe seed notebook's U-Net (Kaggle 2018 Data Science Bowl starter, 485,817 parameters at 3 "
        f"input channels), trained with unet_pl. Input: RGB float32, y and x multiples of 16; preprocessing "
        f"{_preprocessing_words(s)}."
        f"{f' This model reads channel {s.channel} of multi-channel files: feed that channel repeated into the three.' if s.channel else ''}"
        f" Output: sigmoid "
        f"probabilities, channels {', '.join(_channel_names(s))}. unet_pl turns them into nuclei with "
        f"{_watershed_words(s) if s.watershed else 'connected components'} "
        f"(threshold {s.threshold:g}{f', seed threshold {s.seed_threshold:g}' if s.watershed else ''}"
        f"{f', minimum size {s.min_size} px' if s.min_size else ''}).\n\n# Validation\n\nThe package is checked with "
        f"bioimageio.spec's format validation (io checks on), and test_output.npy is what weights.pt in unet.py gives "
        f"for test_input.npy after the declared preprocessing (unet_pl's tests re-run it). Scores of the bundled model: "
        f"docs/model-card.md in the unet_pl repository.\n")
    pre = ([] if grey else
           [{"id": "scale_range", "kwargs": {"axes": ["channel", "y", "x"], "min_percentile": 1.0, "max_percentile": 99.8,
                                             "eps": EPS}}] if s.intensity == "percentile" else
           [{"id": "scale_linear", "kwargs": {"gain": 1 / 255.0, "offset": 0.0}}])
    space = {"min": 16, "step": 16}
    rdf = {
        "type": "model", "format_version": "0.5.4", "name": name,
        "description": "Nuclei in fluorescence, brightfield and H&E images: the 2018 Data Science Bowl starter's U-Net, "
                       f"trained with unet_pl; outputs {' and '.join(_channel_names(s))} probabilities",
        "authors": [{"name": "unet_pl contributors"}],
        "cite": [{"text": "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl, "
                          "Nature Methods 2019", "doi": "10.1038/s41592-019-0612-7"}],
        "license": "MIT", "documentation": "README.md", "covers": ["cover.png"],
        "tags": ["nuclei", "instance-segmentation", "unet", "fluorescence-light-microscopy", "2d", "pytorch"],
        "inputs": [{
            # at most 128 characters (the spec); the package README says more
            "id": "raw", "description": ("RGB, or grey repeated; raw 8/16-bit values; whole images, not tiles (see README)"
                                         if grey else "RGB image (grey images repeated into the three channels)"),
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["red", "green", "blue"]},
                     {"type": "space", "id": "y", "size": space}, {"type": "space", "id": "x", "size": space}],
            "test_tensor": {"source": "test_input.npy", "sha256": _sha256(out / "test_input.npy")},
            "sample_tensor": {"source": "sample_input.tif", "sha256": _sha256(out / "sample_input.tif")},
            "data": {"type": "float32"}, "preprocessing": pre,
        }],
        "outputs": [{
            "id": "probabilities", "description": "sigmoid of the network: " + ", ".join(_channel_names(s)),
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": _channel_names(s)},
                     {"type": "space", "id": "y", "size": {"tensor_id": "raw", "axis_id": "y"}},
                     {"type": "space", "id": "x", "size": {"tensor_id": "raw", "axis_id": "x"}}],
            "test_tensor": {"source": "test_output.npy", "sha256": _sha256(out / "test_output.npy")},
            "sample_tensor": {"source": "sample_output.tif", "sha256": _sha256(out / "sample_output.tif")},
            "data": {"type": "float32", "range": [0.0, 1.0]}, "postprocessing": [{"id": "sigmoid"}],
        }],
        "weights": {"pytorch_state_dict": {
            "source": "weights.pt", "sha256": _sha256(out / "weights.pt"),
            "architecture": {"source": "unet.py", "sha256": _sha256(out / "unet.py"), "callable": arch.__name__,
                             "kwargs": {"in_channels": net.in_channels, "out_channels": net.out_channels, "base_filters": 8}},
            "pytorch_version": torch.__version__.split("+")[0],
        }},
        "config": {"unet_pl": {"settings": {k: v for k, v in vars(s).items()}}},
    }
    rdf_path = out / "rdf.yaml"
    rdf_path.write_text(yaml.safe_dump(rdf, sort_keys=False))
    return rdf_path


def _preprocessing_words(s: Settings) -> str:
    if s.intensity == "grey":
        return ("none: the architecture `GreyUNet` reads raw values (8- or 16-bit) itself: the channels averaged, "
                "stretched between the 1st and 99.8th percentiles, inverted where the background is bright. It decides "
                "that per input, so give it whole images, not tiles (a tile of background alone would be stretched "
                "and inverted on its own)")
    return f"`{'scale_range 1-99.8 percentile' if s.intensity == 'percentile' else 'scale_linear 1/255'}`"


def _watershed_words(s: Settings) -> str:
    if s.out_channels > 2:
        return ("a watershed on max(boundary, (1 - distance) / 2), seeded where foreground > threshold and that map "
                "< seed threshold")
    return "a watershed seeded where foreground > threshold and boundary < seed threshold"


def _channel_names(s: Settings) -> list[str]:
    return ["foreground", "boundary", "distance"][: s.out_channels]


def _cover(image: np.ndarray, prob: np.ndarray, path: Path) -> None:
    from PIL import Image

    left = image.astype(np.uint8) if image.dtype == np.uint8 else (image >> 8).astype(np.uint8)
    right = np.repeat((prob * 255).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(np.concatenate([left, right], axis=1)).save(path)
