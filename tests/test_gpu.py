"""CUDA-only checks (marked ``gpu``, skipped without a CUDA device): the same numbers on the GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unet_pl.lit import LitUNet
from unet_pl.model import UNet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


def test_unet_on_cuda_matches_the_cpu():
    torch.manual_seed(0)
    net = UNet().eval()
    x = torch.rand(4, 3, 128, 128)
    with torch.no_grad():
        cpu = torch.sigmoid(net(x))
        torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
        gpu = torch.sigmoid(net.cuda().to(memory_format=torch.channels_last)(x.cuda().contiguous(memory_format=torch.channels_last)))
    assert (gpu.cpu() - cpu).abs().max().item() < 1e-4


def test_uint8_batch_becomes_float_channels_last_on_the_device():
    model = LitUNet().cuda()
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).cuda(),
             "mask": torch.ones(2, 1, 32, 32, dtype=torch.uint8).cuda()}
    out = model.on_after_batch_transfer(batch)
    assert out["image"].is_cuda and out["image"].dtype == torch.float32
    assert out["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out["image"], batch["image"].float() / 255)


def test_predict_cli_runs_on_the_gpu(tmp_path):
    import lightning.pytorch as pl

    ckpt = tmp_path / "m.ckpt"
    trainer = pl.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(LitUNet(img_size=64))
    trainer.save_checkpoint(ckpt)
    sample = ROOT / "unet_pl" / "sample" / "stage1_train"
    out = tmp_path / "sub.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--ckpt", str(ckpt), "--data-dir", str(sample),
                           "--out", str(out), "--gpus", "1", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuda" in proc.stdout
    assert out.read_text().startswith("ImageId,EncodedPixels")
