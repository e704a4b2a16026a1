"""``scripts/benchmark.py --only predict`` runs and prints its table (small images: what the rows
say, not how fast; the speed targets are read from a full run, docs/performance.md)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_predict_section_prints_every_row_with_its_ratio():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--only", "predict", "--predict-side", "128",
                          "--predict-images", "4", "--tile", "256", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    for row in ("read (tifffile)", "normalise (the model's intensity rule)", "**network alone** (reference)", "post-processing",
                "outputs (label TIFF, CSVs)", "start-up: `scripts/predict.py`", "peak memory, end to end (128 x 128)"):
        assert row in out, row
    ratios = {m.group(1): float(m.group(2)) for m in re.finditer(r"\*\*(end to end[^*]*)\*\* \|[^|]*\|[^|]*\| \*\*([0-9.]+)x\*\*", out)}
    assert set(ratios) == {"end to end (`predict_folder`), 12 images", "end to end, one image at a time (`at_once=1`), 12 images",
                           "end to end, TTA d4, 4 images"}, out
    assert all(r > 0 for r in ratios.values())
    passes = re.search(r"end to end \(`predict_folder`\): [0-9. /]+ \(passes ([0-9.]+), ([0-9.]+) s\)", out)
    assert passes, out  # two passes, each with the network timed around it
    from unet_pl.precision import resolve

    bf16 = resolve("auto", "cpu") == "bf16"  # the default --predict-precision auto: the reference runs as prediction does
    assert f"--precision auto (here {'bfloat16' if bf16 else 'float32'})" in out
    assert ("| network alone in float32 |" in out) == bf16  # what bfloat16 gains, where it runs


def test_a_bad_tile_is_one_line_and_exit_2():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--only", "predict", "--tile", "100"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("benchmark.py: error: --tile 100: tile must be a multiple of 16")
