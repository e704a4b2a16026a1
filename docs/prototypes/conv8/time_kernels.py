"""Times the prototype kernels against oneDNN (torch) on one batch of 16 at 128x128, 8 -> 8 channels.

    cd docs/prototypes/conv8
    gcc -O3 -march=native -fopenmp -shared -fPIC conv8.c -o libconv8.so
    gcc -O3 -march=native -fopenmp -shared -fPIC bww.c -o libbww.so
    OMP_NUM_THREADS=2 python time_kernels.py

Checks each result against torch first. An experiment, not part of unet_pl (see README.md here).
"""
import ctypes
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unet_pl.perf import keep_freed_memory

keep_freed_memory()
here = Path(__file__).resolve().parent
fwd_lib, bww_lib = ctypes.CDLL(str(here / "libconv8.so")), ctypes.CDLL(str(here / "libbww.so"))
P = ctypes.c_void_p


def median_ms(f, r=30):
    for _ in range(5):
        f()
    ts = []
    for _ in range(r):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return sorted(ts)[r // 2] * 1000


N, H, W = 16, 128, 128
gflop = N * H * W * 8 * 8 * 9 * 2 / 1e9
x, g, w, b = torch.randn(N, 8, H, W), torch.randn(N, 8, H, W), torch.randn(8, 8, 3, 3), torch.randn(8)
xp = F.pad(x, (1, 1, 1, 1)).contiguous()
y, gw, gb = torch.empty(N, 8, H, W), torch.empty(8, 8, 3, 3), torch.empty(8)
cl = torch.channels_last
xc, gc, wc = x.contiguous(memory_format=cl), g.contiguous(memory_format=cl), w.contiguous(memory_format=cl)

rows = []
for name in ("conv8_fwd", "conv8_fwd2"):
    run = lambda: getattr(fwd_lib, name)(P(xp.data_ptr()), P(w.data_ptr()), P(b.data_ptr()), P(y.data_ptr()), N, H, W)  # noqa: E731
    run()
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)
    rows.append((f"forward, {name} (NCHW, padded input)", median_ms(run)))
rows.append(("forward, oneDNN channels_last", median_ms(lambda: F.conv2d(xc, wc, b, padding=1))))
rows.append(("padding the input (F.pad)", median_ms(lambda: F.pad(x, (1, 1, 1, 1)))))
run = lambda: bww_lib.conv8_bww(P(xp.data_ptr()), P(g.data_ptr()), P(gw.data_ptr()), P(gb.data_ptr()), N, H, W)  # noqa: E731
run()
_, ref_w, ref_b = torch.ops.aten.convolution_backward(g, x, w, [8], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, True])
torch.testing.assert_close(gw, ref_w, rtol=1e-4, atol=1e-2)
torch.testing.assert_close(gb, ref_b, rtol=1e-4, atol=1e-2)
rows.append(("weight + bias gradient, conv8_bww", median_ms(run)))
rows.append(("weight + bias gradient, oneDNN channels_last", median_ms(
    lambda: torch.ops.aten.convolution_backward(gc, xc, wc, [8], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, True]))))
print("| what | ms | GFLOP/s |\n|---|---:|---:|")
for what, ms in rows:
    print(f"| {what} | {ms:.2f} | {gflop / ms * 1e3:.0f} |" if not what.startswith("padding") else f"| {what} | {ms:.2f} | |")
