"""UNet: the seed's topology, Keras' initialisation, errors that name the fix."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from unet_pl import UNet
from unet_pl.model import conv_layers, nearest_valid_size

#: The seed's Conv2D/Conv2DTranspose kernels in Keras' layer order and layout (kh, kw, a, b):
#: Conv2D (kh, kw, in, out), Conv2DTranspose (kh, kw, out, in). test_keras_parity checks Keras agrees.
SEED_KERNELS = [
    (3, 3, 3, 8), (3, 3, 8, 8),
    (3, 3, 8, 16), (3, 3, 16, 16),
    (3, 3, 16, 32), (3, 3, 32, 32),
    (3, 3, 32, 64), (3, 3, 64, 64),
    (3, 3, 64, 128), (3, 3, 128, 128),
    (2, 2, 64, 128), (3, 3, 128, 64), (3, 3, 64, 64),  # u6, c6, c6
    (2, 2, 32, 64), (3, 3, 64, 32), (3, 3, 32, 32),  # u7, c7, c7
    (2, 2, 16, 32), (3, 3, 32, 16), (3, 3, 16, 16),  # u8, c8, c8
    (2, 2, 8, 16), (3, 3, 16, 8), (3, 3, 8, 8),  # u9, c9, c9
    (1, 1, 8, 1),  # outputs
]


def keras_layout(m: nn.Module) -> tuple[int, ...]:
    return tuple(m.weight.shape[i] for i in (2, 3, 1, 0))


def test_parameter_count_is_the_seeds():
    assert sum(p.numel() for p in UNet().parameters()) == 485_817


def test_layers_are_registered_in_keras_layer_order():
    layers = conv_layers(UNet())
    assert [keras_layout(m) for m in layers] == SEED_KERNELS
    transposed = [i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d)]
    assert transposed == [10, 13, 16, 19]


def test_output_is_logits_of_the_input_size():
    net = UNet().eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 48))
    assert out.shape == (2, 1, 32, 48)
    assert not any(isinstance(m, nn.Sigmoid) for m in net.modules())  # logits: the loss applies the sigmoid


def test_glorot_uniform_kernels_and_zero_biases():
    torch.manual_seed(0)
    for m in conv_layers(UNet()):
        w = m.weight.detach()
        receptive = w[0, 0].numel()
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max() <= limit
        if w.numel() >= 1000:  # uniform on [-limit, limit]: std limit/sqrt(3), spread to the edges
            assert w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.1)
            assert w.abs().max() > 0.9 * limit
        assert torch.count_nonzero(m.bias) == 0


@pytest.mark.parametrize(("h", "w", "fix"), [(100, 128, "96x128"), (128, 120, "128x128"), (8, 32, "16x32")])
def test_size_not_divisible_by_16_names_the_nearest_valid_size(h, w, fix):
    with pytest.raises(ValueError, match=rf"divisible by 16; got {h}x{w}\. Resize or pad to {fix}"):
        UNet()(torch.zeros(1, 3, h, w))


def test_nearest_valid_size():
    assert [nearest_valid_size(n) for n in (0, 1, 8, 9, 16, 23, 24, 25, 100)] == [16, 16, 16, 16, 16, 16, 32, 32, 96]


def test_wrong_channel_count_and_rank_are_refused():
    with pytest.raises(ValueError, match="built for 3 input channels but got 1"):
        UNet()(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects a batch \(N, C, H, W\)"):
        UNet()(torch.zeros(3, 32, 32))
    assert UNet(in_channels=1)(torch.zeros(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_model_module_does_not_import_lightning():
    code = "import sys, unet_pl.model; sys.exit('lightning' in sys.modules or 'pytorch_lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _up_reference(up: nn.ConvTranspose2d, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    return torch.cat([up(x), skip], dim=1)


@pytest.mark.parametrize("c_in,c_out,size", [(16, 8, 8), (128, 64, 4)])
def test_1x1_upsampling_equals_the_transposed_convolution(c_in, c_out, size):
    """The bf16 CPU path's 1x1-convolution + pixel-shuffle view against ConvTranspose2d + cat:
    same values and same gradients for the input, the skip, the kernel and the bias (fp32)."""
    from unet_pl.model import up_concat_1x1

    torch.manual_seed(0)
    up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
    nn.init.normal_(up.bias)  # a zero bias would hide a bias laid out in the wrong order
    x = torch.randn(2, c_in, size, size).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, c_out, 2 * size, 2 * size).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 2 * c_out, 2 * size, 2 * size)
    results = []
    for fn in (_up_reference, up_concat_1x1):
        xs, ss = x.clone().requires_grad_(), skip.clone().requires_grad_()
        up.zero_grad()
        out = fn(up, xs, ss)
        out.backward(grad)
        results.append((out.detach(), xs.grad, ss.grad, up.weight.grad.clone(), up.bias.grad.clone()))
    for name, ref, got in zip(("output", "d input", "d skip", "d kernel", "d bias"), *results):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 16, 48)])  # 16 px: the deepest level is 1 pixel high
def test_bf16_autocast_on_cpu_takes_the_1x1_path_and_agrees_with_fp32(shape):
    from unet_pl import model as model_module

    torch.manual_seed(0)
    net = UNet().to(memory_format=torch.channels_last)
    x = torch.rand(*shape).contiguous(memory_format=torch.channels_last)
    calls = []
    original = model_module.up_concat_1x1

    def spy(*args):
        calls.append(1)
        return original(*args)

    model_module.up_concat_1x1 = spy
    try:
        fp32 = net(x)
        assert not calls  # fp32 keeps ConvTranspose2d
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = net(x)
    finally:
        model_module.up_concat_1x1 = original
    assert len(calls) == 4  # the four up-steps
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.02)
