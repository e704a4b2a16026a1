"""Shared fixtures. Real PNGs come from the bundled sample or are written into tmp folders here."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_pl.data import SAMPLE_DIR

# The full competition set, when this checkout sits beside it (tests that need it skip otherwise).
REAL_DATA_DIR = Path(os.environ.get("UNET_PL_DSB2018", Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache_home(tmp_path_factory):
    """Point the per-user cache (``$XDG_CACHE_HOME/unet_pl``) at a temporary folder for the whole run."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled sample's ``stage1_train`` folder (30 real images, every modality)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def real_train_dir() -> Path:
    """The full ``stage1_train`` of the competition, or skip."""
    d = REAL_DATA_DIR / "stage1_train"
    if not d.is_dir():
        pytest.skip(f"the competition's data is not at {REAL_DATA_DIR} (set UNET_PL_DSB2018)")
    return d


@pytest.fixture(scope="session")
def sample_dm(tmp_path_factory):
    """A ``NucleiDataModule`` on the bundled sample, prepared and set up once for the session (no augmentation)."""
    from unet_pl import NucleiDataModule

    dm = NucleiDataModule(cache_dir=tmp_path_factory.mktemp("sample_cache"), augment="none", num_workers=0, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write ``array`` as a PNG at ``path`` (parents created); ``mode`` as in ``PIL.Image.fromarray``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.fixture
def make_train_dir(tmp_path):
    """Factory: a tiny ``stage1_train`` in tmp_path. ``make_train_dir(n=3, h=40, w=48)`` -> the folder.

    Image ``k`` is RGBA with two square nuclei (bright on dark), one mask PNG ({0, 255}) per nucleus.
    """

    def make(n: int = 3, h: int = 40, w: int = 48, root: Path | None = None) -> Path:
        root = root or tmp_path / "stage1_train"
        rng = np.random.default_rng(0)
        for k in range(n):
            id_ = f"img{k:02d}"
            image = np.zeros((h, w, 4), np.uint8)
            image[..., 3] = 255
            image[..., :3] = rng.integers(0, 30, (h, w, 1))
            for j, (r, c) in enumerate([(4 + k, 5), (h // 2, w // 2 + k)]):
                m = np.zeros((h, w), np.uint8)
                m[r:r + 8, c:c + 9] = 255
                image[m > 0, :3] = 200
                write_png(root / id_ / "masks" / f"m{j}.png", m)
            write_png(root / id_ / "images" / f"{id_}.png", image)
        return root

    return make
