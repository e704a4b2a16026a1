"""atomic_write: the old file or the whole new one, with permissions others can read."""
from __future__ import annotations

import os

import pytest

from unet_pl.atomic import atomic_write


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "cache.npz"
    path.write_bytes(b"old")

    def half(f):
        f.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, half)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["cache.npz"]


def test_permissions_those_of_the_file_replaced_else_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = atomic_write(tmp_path / "a" / "new.ckpt", lambda f: f.write(b"x"))
        assert fresh.read_bytes() == b"x" and fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.ckpt"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        atomic_write(kept, lambda f: f.write(b"new"))
        assert kept.read_bytes() == b"new" and kept.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
