"""One way to replace a file whole: the caches, checkpoints and exported models all write through it."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write(f)`` into a temporary file beside ``path``, then rename it over ``path``: readers see
    the old file or the whole new one, never half (a kill leaves a ``<name>.*.tmp``, which the cache
    clears). Permissions: those of the file replaced, else ``0o666`` less the umask (``mkstemp``'s
    ``0o600`` would hide a shared cache folder from the other users)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)  # atomic on one file system
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
