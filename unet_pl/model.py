"""The seed notebook's U-Net as a plain ``torch.nn.Module``.

Topology (Kaggle "Keras U-Net starter", 2018 Data Science Bowl): five levels of two 3x3 'same'
ReLU convolutions with 8, 16, 32, 64, 128 filters, 2x2 max-pooling on the way down, 2x2
stride-2 transposed convolutions on the way up, skip connections concatenated as
``[upsampled, skip]`` and a 1x1 head. 485,817 parameters at 3 input channels.

This file imports torch only: no Lightning, no paths, no loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Height and width must be multiples of this (four 2x2 poolings).
DIVISOR = 16


def nearest_valid_size(n: int, divisor: int = DIVISOR) -> int:
    """The multiple of ``divisor`` closest to ``n`` (ties and 0 round up)."""
    down = (n // divisor) * divisor
    up = down + divisor if n % divisor else down
    if down == 0:
        return divisor
    return down if n - down < up - n else up


class DoubleConv(nn.Sequential):
    """Two 3x3 'same' convolutions, each followed by ReLU (the seed's ``c1 = Conv2D(...)`` twice)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then a DoubleConv (``p1 = MaxPooling2D``; ``c2 = ...``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """2x2 stride-2 transposed conv, concatenate ``[upsampled, skip]``, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if _bf16_on_cpu(x) and x.is_contiguous(memory_format=torch.channels_last):
            return self.conv(up_concat_1x1(self.up, x, skip))
        return self.conv(torch.cat([self.up(x), skip], dim=1))


def _bf16_on_cpu(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


def up_concat_1x1(up: nn.ConvTranspose2d, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``torch.cat([up(x), skip], dim=1)`` for a 2x2 stride-2 ``up``, computed as a 1x1 convolution.

    The kernel tiles the output without overlap: output pixel ``(2i+a, 2j+b)`` is input pixel
    ``(i, j)`` times the kernel's tap ``(a, b)``. So one 1x1 convolution to ``4 * out`` channels
    (ordered ``a, b, out``) computes all four taps, and in NHWC memory the pixel shuffle is a
    view that ``cat`` reads while it writes ``[upsampled, skip]``. Same parameters, same result
    (to rounding). Used for bf16 on CPUs, where oneDNN's bf16 transposed-convolution backward is
    4-6x slower than this (2 ms of a 50 ms step at batch 16); fp32 keeps ``ConvTranspose2d``.
    ``x`` should be channels_last (else the views become copies); ``skip`` is cast to the
    up-step's dtype (inside the UNet both are already bf16).
    """
    n, _, h, w = x.shape
    out = up.out_channels
    kernel = up.weight.permute(2, 3, 1, 0).reshape(4 * out, up.in_channels, 1, 1)  # rows (a, b, out)
    bias = up.bias.repeat(4) if up.bias is not None else None
    y = F.conv2d(x, kernel, bias).permute(0, 2, 3, 1)  # NHWC (n, h, w, 4 * out), no copy
    y = y.reshape(n, h, w, 2, 2, out).permute(0, 1, 3, 2, 4, 5)  # (n, h, a, w, b, out); a view when NHWC
    s = skip.permute(0, 2, 3, 1).reshape(n, h, 2, w, 2, skip.shape[1])  # a view of the NHWC skip
    z = torch.cat([y, s.to(y.dtype)], dim=-1)  # contiguous (n, h, a, w, b, out + skip)
    return z.view(n, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)  # NCHW shape, channels_last memory


class UNet(nn.Module):
    """The seed's U-Net.

    Args:
        in_channels: image channels (3 for the competition's RGB images).
        out_channels: output maps (1: nucleus foreground).
        base_filters: filters at the first level; doubled at each of the four levels below.

    ``forward(x)``: ``x`` float32 ``(N, in_channels, H, W)`` scaled to [0, 1], H and W multiples
    of 16; returns logits ``(N, out_channels, H, W)`` (apply ``sigmoid`` for probabilities).

    Convolutions are registered in the seed's layer order, so a Keras model's Conv2D and
    Conv2DTranspose layers map one to one onto ``conv_layers(net)``. Initialisation is Keras'
    (Glorot-uniform kernels, zero biases).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_filters: int = 8) -> None:
        super().__init__()
        f = [base_filters * 2**i for i in range(5)]  # 8, 16, 32, 64, 128
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.inc = DoubleConv(in_channels, f[0])  # c1
        self.down1 = Down(f[0], f[1])  # c2
        self.down2 = Down(f[1], f[2])  # c3
        self.down3 = Down(f[2], f[3])  # c4
        self.down4 = Down(f[3], f[4])  # c5
        self.up1 = Up(f[4], f[3])  # u6, c6
        self.up2 = Up(f[3], f[2])  # u7, c7
        self.up3 = Up(f[2], f[1])  # u8, c8
        self.up4 = Up(f[1], f[0])  # u9, c9
        self.head = nn.Conv2d(f[0], out_channels, 1)  # outputs
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults: Glorot-uniform kernels, zero biases."""
        for m in conv_layers(self):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.in_channels)
        c1 = self.inc(x)
        c2 = self.down1(c1)
        c3 = self.down2(c2)
        c4 = self.down3(c3)
        # c5 to c9 in one name, each skip dropped once used: in inference each level's maps are
        # freed as soon as the next exists (a 2048 x 2048 pass peaked 885 MB above its input before, 748 MB now)
        c = self.up1(self.down4(c4), c4)
        del c4
        c = self.up2(c, c3)
        del c3
        c = self.up3(c, c2)
        del c2
        c = self.up4(c, c1)
        del c1
        return self.head(c)


class GreyUNet(UNet):
    """The U-Net with ``intensity="grey"``'s reading in front of it, for packages whose consumers
    cannot apply that rule themselves (bioimage.io's preprocessing cannot invert per image).

    ``forward(x)``: ``x`` float32 ``(N, C, H, W)`` of raw pixel values (8- or 16-bit, any C);
    ``grey_input`` turns it into what the U-Net was trained on. The same weights as ``UNet``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(grey_input(x).repeat(1, self.in_channels, 1, 1))


#: The stretch's percentiles (``unet_pl.data.readers.PERCENTILES``).
PERCENTILES = (1.0, 99.8)


def grey_input(x: torch.Tensor) -> torch.Tensor:
    """Raw ``(N, C, H, W)`` -> float32 ``(N, 1, H, W)`` in [0, 1], per image the numbers of
    ``to_rgb8(raw, "grey") / 255``: the channels' mean, stretched so that its 1st and 99.8th
    percentiles become 0 and 255 (clipped), inverted when its median is above the middle (a bright
    background: nuclei become bright on dark), rounded to whole grey levels. In float64 where numpy
    computes in float64, so that the levels round the same."""
    out = []
    for image in x.float():
        grey = image.mean(dim=0)
        lo, hi = _percentiles(grey, PERCENTILES)
        scaled = ((grey.double() - lo) * (255.0 / max(hi - lo, 1e-6))).clamp(0, 255)
        if _percentiles(scaled, (50.0,))[0] > 127.5:
            scaled = 255.0 - scaled
        out.append((torch.round(scaled) / 255.0).float())
    return torch.stack(out)[:, None]


def _percentiles(values: torch.Tensor, q: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, q)`` (linear), step for step: the neighbours' difference in the
    values' own dtype, the interpolation in float64 from whichever neighbour is nearer. No size
    limit (``torch.quantile`` has one)."""
    v = values.flatten().sort().values
    n = v.numel()
    out = []
    for p in q:
        at = (n - 1) * (p / 100.0)
        i = int(at)
        j = min(i + 1, n - 1)
        t = at - i
        a, b, diff = float(v[i]), float(v[j]), float(v[j] - v[i])
        out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
    return out


def conv_layers(net: nn.Module) -> list[nn.Module]:
    """Every Conv2d and ConvTranspose2d in registration (= the seed's layer) order."""
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def check_input_shape(x: torch.Tensor, in_channels: int) -> None:
    """Raise a ``ValueError`` that names the fix when ``x`` cannot go through the U-Net."""
    if x.ndim != 4:
        raise ValueError(f"UNet expects a batch (N, C, H, W); got a tensor of shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c != in_channels:
        raise ValueError(
            f"UNet was built for {in_channels} input channels but got {c}; "
            f"convert images to {in_channels} channels (grey: repeat; RGBA: drop alpha)"
        )
    if h % DIVISOR or w % DIVISOR:
        raise ValueError(
            f"UNet needs height and width divisible by {DIVISOR}; got {h}x{w}. "
            f"Resize or pad to {nearest_valid_size(h)}x{nearest_valid_size(w)} "
            f"(unet_pl.segment pads and crops back for you)"
        )
