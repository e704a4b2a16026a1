"""``python scripts/evaluate.py --pred submission.csv --truth SOLUTION [--out per_image.csv]``

Scores a submission CSV with the 2018 Data Science Bowl's metric. SOLUTION is a run-length CSV:
a solution CSV (``ImageId,EncodedPixels,Height,Width[,Usage]``) or a ``stage1_train_labels.csv``
(``ImageId,EncodedPixels``) with the image folders (``<id>/images/<id>.png``) beside it; or a
folder of annotations, read as train.py reads it: the competition's ``stage1_train`` layout
(``<id>/images/<id>.png`` with ``<id>/masks/``, one file per nucleus; or the folder holding
``stage1_train``), or ``images/<name>.tif`` with ``masks/<name>.tif`` (or ``labels/``) label images
of the same names, as Fiji, QuPath, napari and Cellpose export them (0 background, one integer
per nucleus). A binary mask there gets a warning: touching nuclei in it are scored as one.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from ..data.holdout import HOLDOUTS
from ..evaluation import evaluate, holdout_truth_ids
from ..metrics import THRESHOLDS
from .common import Parser, fail, holdout_arg


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--pred", required=True, help="submission CSV (ImageId,EncodedPixels)")
    p.add_argument("--truth", required=True,
                   help="a solution CSV (ImageId,EncodedPixels,Height,Width), a stage1_train_labels.csv beside its image "
                        "folders, a stage1_train folder (<id>/masks/, one file per nucleus) or the folder holding it, or "
                        "a folder of images/ with masks/ (or labels/) label images of the same names")
    p.add_argument("--out", help="per-image CSV to write (image, score, counts, score at each threshold)")
    p.add_argument("--holdout", choices=HOLDOUTS, type=holdout_arg, default="none",
                   help="stratified: score only the fixed hold-out of the truth's images (unet_pl.data.holdout); "
                        "group:k/K: only fold k of K of the grouped cross-validation (unet_pl.data.groups); "
                        "predictions for other images are reported as extra")
    p.add_argument("--ckpt", default=None,
                   help="score the hold-out this checkpoint's run saved (the images predict.py --holdout predicts "
                        "with it), not the one computed from the truth's images; --holdout: default the run's own")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if Path(args.pred).is_dir():
        near = [p / "submission.csv" for p in (Path(args.pred), *list(Path(args.pred).parents)[:2])]
        found = next((str(p) for p in near if p.is_file()), None)
        fail(f"--pred {args.pred} is a folder; pass the CSV that predict.py wrote, " + (
            f"here {found}" if found else "OUT_DIR/submission.csv (or predict.py's --out)"))
    if not Path(args.pred).is_file():
        fail(f"{args.pred}: no such file; pass the CSV that predict.py wrote")
    if args.ckpt and args.holdout == "none":  # the hold-out its run saved, whichever it was
        from ..inference.checkpoint import read_checkpoint

        try:
            args.holdout = (read_checkpoint(args.ckpt).get("NucleiDataModule") or {}).get("holdout") or "none"
        except (FileNotFoundError, ValueError) as e:
            fail(f"--ckpt: {e}")
        if args.holdout == "none":
            fail(f"--ckpt {args.ckpt}: its run held no images out (trained without --holdout), so there is no hold-out "
                 "of its own to score; leave --ckpt out to score every image of the truth")
    t0 = time.perf_counter()
    try:
        ids = None if args.holdout == "none" else _holdout(args)
        # a checkpoint's hold-out in a subset of its folder: the images the subset holds
        rows, missing, extra, outside = evaluate(args.pred, args.truth, ids, only_present=bool(args.ckpt))
        if args.ckpt and not rows:
            raise ValueError(f"--ckpt {args.ckpt}: none of the {len(ids)} images its run held out is in the truth "
                             f"{args.truth} (first: {ids[0]}); pass the stage1_train folder it trained on")
        if args.ckpt and len(rows) < len(ids):
            print(f"hold-out: {len(rows)} of them are in {args.truth} and are scored (the others are not in it)")
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    took = time.perf_counter() - t0
    if rows and len(missing) == len(rows) and extra and not outside:
        fail(f"no image of {args.pred} ({len(extra)}, e.g. {sorted(extra)[0]}) is in the truth {args.truth} "
             f"({len(rows)} images, e.g. {sorted(missing)[0]}): wrong --pred or --truth?")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    per_t = np.mean([[r[f"score@{t:.2f}"] for t in THRESHOLDS] for r in rows], 0)
    score = float(np.mean([r["score"] for r in rows]))
    print(f"score {score:.4f} over {len(rows)} images ({took:.1f} s)")
    print("per threshold: " + "  ".join(f"{t:.2f}:{v:.3f}" for t, v in zip(THRESHOLDS, per_t)))
    if missing:
        print(f"{len(missing)} truth images have no prediction rows (scored as empty): {_ids(missing)}")
    if outside:
        print(f"{len(outside)} predicted images are in the truth but not in this hold-out (ignored): {_ids(outside)}"
              + ("" if args.ckpt else "; if the predictions are a checkpoint's saved hold-out, pass --ckpt CKPT"))
    if extra:
        print(f"{len(extra)} predicted images are not in the truth (ignored): {_ids(extra)}")
    if args.out:
        print(f"per-image scores: {args.out}")


def _holdout(args) -> list[str]:
    """The hold-out ids to score: the checkpoint's saved ones (--ckpt), else computed from the truth; says which."""
    if args.ckpt:
        from ..inference.checkpoint import read_checkpoint

        saved = read_checkpoint(args.ckpt).get("NucleiDataModule") or {}
        if saved.get("holdout") != args.holdout or not saved.get("holdout_ids"):
            why = (f"it trained with --holdout {saved.get('holdout', 'none')}" if saved.get("holdout") != args.holdout
                   else "it holds no hold-out ids")
            raise ValueError(f"--ckpt {args.ckpt}: its run saved no --holdout {args.holdout} ({why}); leave --ckpt out "
                             "to compute the hold-out from the truth")
        print(f"hold-out: the {len(saved['holdout_ids'])} images that {args.ckpt}'s run never trained on")
        return list(saved["holdout_ids"])
    ids = holdout_truth_ids(args.truth, args.holdout)
    print(f"hold-out: {len(ids)} images, computed from the images of {args.truth} (the full stage1_train gives the "
          "hold-out train.py and crossval.py use; a subset of it gives other images)")
    return ids


def _ids(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


if __name__ == "__main__":
    main()
