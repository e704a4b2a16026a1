"""``python scripts/predict.py --ckpt RUN/best.ckpt --data-dir FOLDER --out submission.csv``

Predicts every image of FOLDER (the competition's test layout ``<id>/images/<id>.png`` or a
plain folder of images) and writes the submission CSV; optionally label PNGs and overlays.
"""
from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a Lightning checkpoint of LitUNet (RUN/best.ckpt)")
    src.add_argument("--keras-h5", help="the notebook's saved Keras model (.h5), through unet_pl.keras_import")
    p.add_argument("--data-dir", required=True, help="folder of images to predict")
    p.add_argument("--out", default="submission.csv", help="submission CSV to write (ImageId,EncodedPixels)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a pixel is nucleus")
    p.add_argument("--min-size", type=int, default=0, help="drop predicted nuclei smaller than this many pixels")
    p.add_argument("--fill-holes", action="store_true", help="fill holes inside each predicted nucleus")
    p.add_argument("--tta", choices=("none", "flips", "d4"), default="none",
                   help="test-time augmentation: average 4 flips or all 8 flips and 90-degree rotations (none: the notebook)")
    p.add_argument("--split", choices=("auto", "components", "watershed"), default="auto",
                   help="how foreground becomes nuclei: components (the notebook), watershed (needs a --head mask+boundary "
                        "checkpoint); auto: watershed when the checkpoint has a boundary output")
    p.add_argument("--seed-threshold", type=float, default=None,
                   help="watershed seeds: foreground pixels whose boundary probability is below this. Default: 0.15 for "
                        "native-resolution checkpoints, 0.5 for resized ones (each chosen on the training images' validation split)")
    p.add_argument("--holdout", choices=("none", "stratified"), default="none",
                   help="stratified: predict only the fixed hold-out of a stage1_train --data-dir (unet_pl.holdout)")
    p.add_argument("--tile", type=int, default=1024,
                   help="native-resolution checkpoints: images with a side above this go through in overlapping tiles")
    p.add_argument("--masks-dir", help="also write a 16-bit label PNG per image (original size) here")
    p.add_argument("--overlays-dir", help="also write each image with predicted outlines here")
    p.add_argument("--img-size", type=int, help="square side the model sees (default: the checkpoint's img_size; 128 for .h5)")
    p.add_argument("--gpus", type=int, default=None, help="0: CPU; default: CUDA when available")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2, help="threads decoding the images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        _fail(f"--threshold {args.threshold} must lie in [0, 1]")
    if args.batch_size < 1 or args.num_workers < 0 or args.min_size < 0:
        _fail("--batch-size must be >= 1, --num-workers and --min-size >= 0")
    from ..model import DIVISOR, nearest_valid_size
    from ..predict import choose_device, load_model, predict_folder

    if args.img_size is not None and (args.img_size < DIVISOR or args.img_size % DIVISOR):
        _fail(f"--img-size {args.img_size} must be a multiple of {DIVISOR}; try {nearest_valid_size(args.img_size)}")

    if args.tile < 128 or args.tile % DIVISOR:
        _fail(f"--tile {args.tile} must be a multiple of {DIVISOR}, at least 128")
    if args.seed_threshold is not None and not 0.0 <= args.seed_threshold <= 1.0:
        _fail(f"--seed-threshold {args.seed_threshold} must lie in [0, 1]")

    try:
        device = choose_device(args.gpus)
        model = load_model(args.ckpt, args.keras_h5, args.img_size, device)
        if args.split == "watershed" and model.hparams.out_channels < 2:
            raise ValueError("--split watershed needs a boundary output: a checkpoint trained with --head mask+boundary")
        ids = None
        if args.holdout != "none":
            from ..holdout import holdout_ids

            ids = holdout_ids(args.data_dir, args.holdout)
        t0 = time.perf_counter()
        stats = predict_folder(model, args.data_dir, args.out, device=device, threshold=args.threshold,
                               min_size=args.min_size, batch_size=args.batch_size, num_workers=args.num_workers,
                               masks_dir=args.masks_dir, overlays_dir=args.overlays_dir,
                               progress=not args.no_progress, tta=args.tta, holes=args.fill_holes,
                               split=None if args.split == "auto" else args.split, seed_threshold=args.seed_threshold,
                               tile=args.tile, ids=ids)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    took = time.perf_counter() - t0
    print(f"wrote {args.out}: {stats['images']} images, {stats['nuclei']} nuclei "
          f"({stats['empty']} images without any) in {took:.1f} s on {device}")


def _fail(message: str) -> None:
    print(f"predict.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
