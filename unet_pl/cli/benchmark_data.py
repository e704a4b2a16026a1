"""Benchmark of preparing the data: cold and cached ``NucleiDataModule.prepare_data`` on a whole
``stage1_train`` folder, against the seed notebook's own loader (skimage ``imread`` + ``resize``
per mask, one process) on a subset, in the same run. Prints one Markdown table.

    python scripts/benchmark_data.py --data-dir ../shared/data/dsb2018/stage1_train
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time


def notebook_loader(train_dir: str, ids: list[str], size: int, anti_aliasing: bool | None) -> None:
    """The seed notebook's loop (``anti_aliasing=None``: today's scikit-image default, which blurs)."""
    import numpy as np
    from skimage.io import imread
    from skimage.transform import resize

    for id_ in ids:
        path = os.path.join(train_dir, id_)
        img = imread(path + "/images/" + id_ + ".png")[:, :, :3]
        resize(img, (size, size), mode="constant", preserve_range=True, anti_aliasing=anti_aliasing)
        mask = np.zeros((size, size, 1), dtype=bool)
        for mask_file in next(os.walk(path + "/masks/"))[2]:
            mask_ = imread(path + "/masks/" + mask_file)
            mask_ = np.expand_dims(resize(mask_, (size, size), mode="constant", preserve_range=True, anti_aliasing=anti_aliasing), axis=-1)
            mask = np.maximum(mask, mask_)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="stage1_train folder (default: the bundled sample)")
    p.add_argument("--img-size", type=int, default=128, help="square side (default 128)")
    p.add_argument("--subset", type=int, default=40, help="images the notebook's slow loader reads (default 40)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    args = p.parse_args(argv)

    from ..data import SAMPLE_DIR, NucleiDataModule
    from ..images import resolve_train_dir

    train_dir = resolve_train_dir(args.data_dir or SAMPLE_DIR)
    ids = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    n = len(ids)
    rows: list[tuple[str, int, float]] = []
    cache = tempfile.mkdtemp(prefix="unet_pl_bench_")
    try:
        for name, csv in (("mask PNGs", None), ("labels CSV", True)):
            if csv and not (train_dir.parent / "stage1_train_labels.csv").is_file():
                continue
            kw = dict(img_size=args.img_size, cache_dir=cache, labels_csv=csv, progress=False, decode_workers=args.workers)
            t = time.perf_counter()
            NucleiDataModule(train_dir, **kw).prepare_data()
            rows.append((f"ours, first run (cold), {name}, {args.workers} threads", n, time.perf_counter() - t))
            t = time.perf_counter()
            dm = NucleiDataModule(train_dir, **kw)
            dm.prepare_data()
            dm.setup("fit")
            rows.append((f"ours, cached (prepare_data + setup), {name}", n, time.perf_counter() - t))
        sub = random.Random(0).sample(ids, min(args.subset, n))
        for aa, label in ((None, "today's skimage (anti-aliased)"), (False, "2018 skimage (no anti-aliasing)")):
            t = time.perf_counter()
            notebook_loader(str(train_dir), sub, args.img_size, aa)
            rows.append((f"notebook loader, {label}, 1 process", len(sub), time.perf_counter() - t))
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    cold = rows[0][2] / rows[0][1]
    print(f"{train_dir}: {n} images at {args.img_size} px; load average {os.getloadavg()[0]:.2f}\n")
    print("| what | images | seconds | ms/image | notebook loader / ours (cold, mask PNGs) |\n|---|---:|---:|---:|---:|")
    for what, k, s in rows:
        ratio = f"{(s / k) / cold:.1f}x" if what.startswith("notebook") else ""
        print(f"| {what} | {k} | {s:.2f} | {1000 * s / k:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
