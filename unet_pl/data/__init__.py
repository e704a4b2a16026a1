"""Files and annotations in: readers (``images``), the decoded caches (``cache``), datasets, the
augmentation presets, training targets, the hold-out, and the one ``NucleiDataModule``.

Only ``NucleiDataModule`` (``module``) imports Lightning, and it loads on first use: the readers
serve prediction, which never imports Lightning.
"""
from pathlib import Path

#: The bundled sample's ``stage1_train`` folder (30 real images of every modality).
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample" / "stage1_train"

_LAZY = {"NucleiDataModule": ".module", "EMPTY_MASKS": ".module", "default_workers": ".module", "split_indices": ".module",
         "list_images": ".images", "read_image": ".images", "read_labels_csv": ".images", "LABELS_CSV": ".images"}
__all__ = ["SAMPLE_DIR", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
