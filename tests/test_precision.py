"""The network's arithmetic at prediction: float32, or bfloat16 where the hardware computes it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_pl.data import SAMPLE_DIR
from unet_pl.data.images import read_image
from unet_pl.inference import Settings, load_model, probabilities, segment
from unet_pl.metrics import dsb_image_score
from unet_pl.precision import describe, resolve

ROOT = Path(__file__).resolve().parents[1]


def _native(monkeypatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


def test_auto_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    _native(monkeypatch, True)
    assert resolve("auto", "cpu") == "bf16"
    assert describe("auto", "cpu") == "network in bfloat16 (native on this CPU)"
    _native(monkeypatch, False)  # AVX512 without BF16: emulated bfloat16 is many times slower than float32
    assert resolve("auto", "cpu") == "32"
    assert describe("auto", "cpu") == "network in float32 (no native bfloat16 on this CPU)"
    assert resolve("bf16", "cpu") == "bf16" and resolve("32", "cpu") == "32"  # asked for: as asked
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        Settings(precision="fp16")


def test_bfloat16_runs_in_bfloat16_and_finds_the_same_nuclei(monkeypatch):
    """The bundled model on sample images: bfloat16 moves the probabilities (it did run in bfloat16)
    by at most a few hundredths, and its nuclei match float32's at the competition's IoU thresholds
    (the DSB score of one against the other)."""
    net = load_model()
    ids = sorted(p.name for p in SAMPLE_DIR.iterdir())[:6]
    for i in ids:
        image = read_image(SAMPLE_DIR / i / "images" / f"{i}.png")
        p32, p16 = (probabilities(net, image, precision=p) for p in ("32", "bf16"))
        assert not np.array_equal(p32, p16)
        assert np.abs(p32 - p16).max() < 0.05 and np.abs(p32 - p16).mean() < 0.002, i
        l32, l16 = (segment(net, image, precision=p) for p in ("32", "bf16"))
        assert dsb_image_score(l32, l16).score > 0.9, i
    _native(monkeypatch, False)  # auto without native bfloat16 is float32 itself
    assert np.array_equal(probabilities(net, image, precision="auto"), p32)
    assert describe("bf16", "cpu") == "network in bfloat16 (emulated on this CPU: slower than float32)"
    _native(monkeypatch, True)  # and with it, bfloat16: the same numbers as precision='bf16' above
    assert np.array_equal(probabilities(net, image, precision="auto"), p16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's own autocast (trainer.predict, bf16-mixed)
        _native(monkeypatch, False)
        assert np.array_equal(probabilities(net, image, precision="auto"), p16)  # auto leaves it on
        assert np.array_equal(probabilities(net, image, precision="32"), p32)  # 32 is float32 all the same


@pytest.mark.parametrize("precision, words", [("32", "network in float32"), ("bf16", "network in bfloat16")])
def test_predict_cli_says_which_arithmetic_it_ran(tmp_path, precision, words):
    i = sorted(p.name for p in SAMPLE_DIR.iterdir())[0]
    p = subprocess.run([sys.executable, "scripts/predict.py", "--gpus", "0", "--no-progress", "--precision", precision,
                        "--data-dir", str(SAMPLE_DIR / i / "images" / f"{i}.png"), "--out", str(tmp_path / "s.csv")],
                       capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("settings"))
    assert line.split(", ")[-1].startswith(words), line  # bf16 on a CPU without it adds "(emulated ...)"
