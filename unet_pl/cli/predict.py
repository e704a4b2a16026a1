"""``python scripts/predict.py --data-dir FOLDER --out-dir predictions [--ckpt RUN/best.ckpt]``

Segments every image of FOLDER (one image file, a plain folder of images, or the competition's
test layout ``<id>/images/<id>.png``) with a checkpoint, or with the bundled pretrained model when
--ckpt is left out, and writes label TIFFs, per-nucleus and per-image tables and the Kaggle CSV
(unet_pl.inference.outputs). The reading and post-processing settings are the checkpoint's; flags
override them. Nothing is written inside FOLDER, and nothing is replaced until every image is done.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from ..data.holdout import HOLDOUTS
from ..data.readers import BACKGROUNDS, INTENSITIES, INTENSITY_HELP
from ..inference.postprocess import SPLITS
from ..inference.scale import AUTO_BAND
from ..inference.scale import MODES as SCALE_MODES
from ..inference.tta import TTAS
from ..precision import PREDICT_PRECISIONS
from ..precision import describe as describe_precision
from .common import Parser, fail, flag_names, holdout_arg, program_name


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="predict.py", description=__doc__.split("\n\n")[1])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="a Lightning checkpoint of LitUNet (RUN/best.ckpt). Default: the bundled pretrained model")
    src.add_argument("--keras-h5", help="the notebook's saved Keras model (.h5), through unet_pl.keras")
    p.add_argument("--data-dir", required=True, help="folder of images to predict, or one image file")
    p.add_argument("--out-dir", default=None,
                   help="folder for this run's results: labels/<id>.tif, nuclei.csv, summary.csv, submission.csv (and "
                        "rois/, probabilities/, overlays/ when asked). Without it only the submission CSV is written "
                        "(--out, default submission.csv here), and --masks-dir / --overlays-dir when given")
    p.add_argument("--out", default=None, help="the submission CSV (ImageId,EncodedPixels). Default: OUT_DIR/submission.csv, "
                                                 "or submission.csv without --out-dir")
    p.add_argument("--rois", action="store_true", help="with --out-dir: an ImageJ ROI zip per image (rois/<id>.zip)")
    p.add_argument("--probabilities", action="store_true",
                   help="with --out-dir: the probability maps, float32 TIFF per image (probabilities/<id>.tif)")
    p.add_argument("--overlays", action="store_true", help="with --out-dir: each image with its nuclei outlined (overlays/<id>.png)")
    post = p.add_argument_group("post-processing (default: what the checkpoint was tuned with on its validation images; "
                                "checkpoints without: threshold 0.5, no size filter, seed threshold 0.15 native / 0.5 resized)")
    post.add_argument("--threshold", type=float, default=None, help="probability above which a pixel is nucleus")
    post.add_argument("--min-size", type=int, default=None, help="drop predicted nuclei smaller than this many pixels")
    post.add_argument("--min-relative-size", type=float, default=None, metavar="F",
                      help="drop nuclei smaller than F times the image's median nucleus area, e.g. 0.2 (default 0: off)")
    post.add_argument("--min-probability", type=float, default=None, metavar="P",
                      help="drop nuclei whose mean foreground probability is under P, e.g. 0.7 (default 0: off)")
    post.add_argument("--fill-holes", action="store_true", default=None, help="fill holes inside each predicted nucleus")
    post.add_argument("--split-concave", action="store_true", default=None,
                      help="cut predicted nuclei shaped like two or more touching ones (solidity under 0.92, at least 1.5 x "
                           "the image's median nucleus area) at the peaks of their distance transform")
    post.add_argument("--split", choices=("auto", *SPLITS), default="auto",
                      help="how foreground becomes nuclei: components (the notebook), watershed (needs a checkpoint with a "
                           "boundary output, --head mask+boundary or mask+boundary+distance); auto: watershed when it has one")
    post.add_argument("--seed-threshold", type=float, default=None,
                      help="watershed seeds: foreground pixels whose boundary probability is below this (with a distance "
                           "output, also whose depth is above 1 - 2 x this)")
    p.add_argument("--channel", type=int, default=None, metavar="N",
                   help="the nuclear channel of multi-channel files, from 1 (default: the checkpoint's)")
    p.add_argument("--intensity", choices=INTENSITIES, default=None,
                   help=f"{INTENSITY_HELP} (default: the checkpoint's, i.e. as it was trained)")
    p.add_argument("--background", choices=BACKGROUNDS, default="auto",
                   help="grey and hematoxylin rules: auto inverts images whose background reads bright (brightfield, "
                        "H&E); dark never inverts (fluorescence, also crowded or overexposed fields that auto may "
                        "misread: summary.csv's background column says how each image was read); bright always inverts")
    p.add_argument("--tta", choices=TTAS, default="none",
                   help="test-time augmentation: average 4 flips or all 8 flips and 90-degree rotations (none: the notebook)")
    p.add_argument("--precision", choices=PREDICT_PRECISIONS, default="auto",
                   help="the network's arithmetic: auto: bfloat16 where the CPU or GPU computes it natively (AVX512-BF16, "
                        "AMX, Ampere or later; 1.6x the network's speed on a Zen 5 CPU, the same scores), else float32; "
                        "32: float32 everywhere (the same probabilities on every machine, to rounding); bf16: bfloat16 "
                        "even where it is only emulated (slower than float32 there)")
    p.add_argument("--holdout", choices=HOLDOUTS, type=holdout_arg, default="none",
                   help="stratified: predict only the fixed hold-out of a stage1_train --data-dir (the ids the "
                        "checkpoint's run held out; computed from the images for older checkpoints); group:k/K: only "
                        "fold k of K of the grouped cross-validation (unet_pl.data.groups)")
    p.add_argument("--scale", default=None, metavar="auto|certainty|FACTOR",
                   help="native-resolution checkpoints: resize each image by FACTOR before the network (0.5 for images at "
                        "twice the training magnification), or auto: a first pass measures the nuclei; an image whose median "
                        f"nucleus is below {AUTO_BAND[0]:g} px (the training median) is enlarged to it, above "
                        f"{AUTO_BAND[1]:g} px shrunk to it, and predicted again; or certainty: one pass at 1 and one at 0.5 "
                        "without TTA, and each image kept at the one whose foreground the network is surer of (helps grainy nuclei read as pieces; a quarter pass "
                        "more per image without TTA, 1.25 passes more with it) (default 1: as they are)")
    p.add_argument("--tile", type=int, default=2048,
                   help="native-resolution checkpoints: images with a side above this go through in overlapping tiles of at most this side (default 2048: about 0.9 GB for the network)")
    p.add_argument("--masks-dir", help="also write a 16-bit label PNG per image (original size) here (older; see --out-dir)")
    p.add_argument("--overlays-dir", help="also write each image with predicted outlines here (older; see --overlays)")
    p.add_argument("--img-size", type=int, help="square side the model sees (default: the checkpoint's img_size; 128 for .h5)")
    p.add_argument("--gpus", type=int, default=None, help="0: CPU; default: CUDA when available")
    p.add_argument("--batch-size", type=int, default=8, help="resized images per forward pass (resize-mode checkpoints)")
    p.add_argument("--num-workers", type=int, default=2, help="threads decoding the images")
    p.add_argument("--at-once", type=int, default=None,
                   help="images predicted at once, each on its share of the CPU threads (default 2 on a CPU with 2 "
                        "threads or more: faster on a folder; 1 on a GPU; 1 keeps the peak memory of one image)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    """predict.py; Ctrl-C or SIGTERM at any point: one line, exit 130 / 143, nothing written or replaced."""
    previous = _sigterm_as_interrupt()
    try:
        _main(argv)
    except KeyboardInterrupt as e:
        print(f"{program_name()}: interrupted: no result was written or replaced (the images done so far are dropped); "
              "run the same command again", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, _Terminated) else 130) from None  # the shell's 128 + signal, as train.py
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0),
                             ("--at-once", args.at_once, 1),
                             ("--min-size", args.min_size, 0)):
        if value is not None and value < low:
            fail(f"{flag} must be >= {low}, got {value}")
    from ..inference.checkpoint import PRETRAINED, load_model, read_checkpoint
    from ..inference.folder import SQUASH_WARNING, choose_device, predict_folder
    from ..data.images import list_images
    from ..inference.outputs import STAGING_PREFIX, check_outputs
    from ..inference.settings import UNTRAINED_SCORE, untrained_warning
    from .run_folder import sibling

    if (args.rois or args.probabilities or args.overlays) and args.out_dir is None:
        fail("--rois, --probabilities and --overlays write into --out-dir: pass --out-dir FOLDER")
    for flag, folder in (("--out-dir", args.out_dir), ("--masks-dir", args.masks_dir), ("--overlays-dir", args.overlays_dir)):
        if folder and Path(folder).is_file():
            fail(f"{flag} {folder} is a file; it takes a folder (made when missing), e.g. {flag} predictions")
    folders = [Path(d).resolve() for d in (args.out_dir, args.masks_dir, args.overlays_dir) if d]
    if args.out and (Path(args.out).is_dir() or Path(args.out).resolve() in folders):
        fail(f"--out {args.out} names a folder; it takes the submission CSV's file name, e.g. --out "
             f"{Path(args.out) / 'submission.csv'} (or --out-dir {args.out} for all the results)")
    if args.out:
        _check_submission_path(args.out)
    out_csv = args.out or (str(Path(args.out_dir) / "submission.csv") if args.out_dir else "submission.csv")
    try:
        if not Path(args.data_dir).expanduser().exists():
            list_images(args.data_dir)  # its one-line error (with the wildcard hint), before the model loads
        check_outputs(args.data_dir, {"--out-dir": args.out_dir, "--out": out_csv, "--masks-dir": args.masks_dir,
                                      "--overlays-dir": args.overlays_dir})
        device = choose_device(args.gpus)
        source = args.ckpt or args.keras_h5 or PRETRAINED
        ckpt = read_checkpoint(args.ckpt or PRETRAINED) if not args.keras_h5 else None
        net = load_model(ckpt, args.keras_h5, device, name=source)
        settings = net.settings.replace(threshold=args.threshold, min_size=args.min_size, fill_holes=args.fill_holes,
                                        split_concave=args.split_concave,
                                        min_relative_size=args.min_relative_size, min_probability=args.min_probability,
                                        seed_threshold=args.seed_threshold, tta=args.tta, tile=args.tile, scale=args.scale,
                                        img_size=args.img_size, split=None if args.split == "auto" else args.split,
                                        channel=args.channel, intensity=args.intensity, precision=args.precision,
                                        background=args.background)
    except (FileNotFoundError, ValueError) as e:
        fail(flag_names(str(e)))
    if not (args.ckpt or args.keras_h5):
        print(f"model: the bundled pretrained model ({PRETRAINED.name}; docs/model-card.md); --ckpt to use your own")
    ids = None
    if args.holdout != "none":
        saved = (ckpt or {}).get("NucleiDataModule") or {}
        if saved.get("holdout") == args.holdout and saved.get("holdout_ids"):
            ids = saved["holdout_ids"]
            print(f"hold-out: the {len(ids)} images that {source}'s run never trained on")
        else:
            from ..data.holdout import holdout_ids

            try:
                ids = holdout_ids(args.data_dir, args.holdout)
            except (FileNotFoundError, ValueError) as e:
                fail(str(e))
            print(f"hold-out: {len(ids)} images, computed from the images of {args.data_dir} (the full stage1_train "
                  "gives the hold-out train.py and crossval.py use; a subset of it gives other images)")
            if saved.get("holdout") not in (None, "none", args.holdout):
                print(f"warning: {source} was trained with --holdout {saved['holdout']}, not {args.holdout}: some of "
                      "these images may have been in its training set")
    hp = (ckpt or {}).get("hyper_parameters") or {}
    tuned = bool(hp.get("postprocess"))
    how = ("tuned on the run's validation images" + (" with the cut" if settings.cut_tuned else "")) if tuned else "defaults"
    print(f"settings ({how}, then flags): {settings.describe()}, {describe_precision(settings.precision, device)}")
    if tuned and isinstance(hp.get("tune_score"), (int, float)) and hp["tune_score"] < UNTRAINED_SCORE:
        print(f"warning: {source}: {untrained_warning(hp['tune_score'])}")
    if ckpt is not None and not tuned and settings.out_channels > 1 and "optimizer_states" in ckpt:
        print(f"note: {source}'s post-processing was never chosen on its validation images (the run was interrupted "
              f"before the end, or trained with --tune off): finish the run with train.py --resume, or choose it now "
              f"with: {sibling('tune')} --ckpt {shlex.quote(args.ckpt)}")
    if args.intensity and hp.get("intensity") and args.intensity != hp["intensity"]:
        print(f"warning: {source} was trained on images read with --intensity {hp['intensity']}; with --intensity "
              f"{args.intensity} it sees them differently and may find less (use the flag for checkpoints that recorded no rule)")
    t0 = time.perf_counter()
    try:
        stats = predict_folder(net, args.data_dir, out_csv, settings=settings, ids=ids, batch_size=args.batch_size,
                               num_workers=args.num_workers, out_dir=args.out_dir, rois=args.rois,
                               probabilities=args.probabilities, overlays=args.overlays, masks_dir=args.masks_dir,
                               overlays_dir=args.overlays_dir, progress=not args.no_progress, at_once=args.at_once)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    except OSError as e:  # a full disk, a folder made read-only meanwhile: nothing was replaced (Outputs)
        where = Path(e.filename or args.out_dir or out_csv)
        where = next((p.parent for p in (where, *where.parents) if p.name.startswith(STAGING_PREFIX)), where)
        fail(f"cannot write into {where} ({e.strerror or e}); the previous results are unchanged: free some space or "
             "choose an output folder you can write to (--out-dir)")
    took = time.perf_counter() - t0
    n = stats["images"]
    print(f"done: {n} image{'s' * (n != 1)}, {stats['nuclei']} {'nucleus' if stats['nuclei'] == 1 else 'nuclei'} ({stats['empty']} without any) in {took:.1f} s on {device}")
    if args.out_dir:
        inside = Path(out_csv).resolve().parent == Path(args.out_dir).resolve()
        outputs = [o for o in stats["outputs"] if inside or o != Path(out_csv).name]
        print(f"results: {args.out_dir} ({', '.join(outputs)})" + ("" if inside else f", {out_csv}"))
        if stats.get("earlier"):
            print(f"note: {args.out_dir} also holds {stats['earlier']} file(s) of earlier runs for images this one wrote "
                  "nothing for, not in it or unreadable (kept; nuclei.csv and summary.csv list this run's images only)")
    else:
        print(f"results: {out_csv}" + "".join(f", {d}" for d in (args.masks_dir, args.overlays_dir) if d))
    if settings.background == "auto" and any(stats["inverted"].values()):
        print(background_line(stats["inverted"], bool(args.out_dir)))
    if settings.scale in SCALE_MODES and stats["scales"]:
        print(scale_line(settings.scale, stats["scales"], bool(args.out_dir)))
    if stats.get("least_sure") and stats["nuclei"]:  # none anywhere: the warning below says it
        names = ", ".join(f"{i} ({'no nuclei' if p is None else f'{p:.2f}'})" for i, p in stats["least_sure"])
        more = sum(p is None for p in stats["sureness"].values()) - sum(p is None for _, p in stats["least_sure"])
        names += f" and {more} more without nuclei" if more else ""
        found = [p for p in stats["sureness"].values() if p is not None]
        median = f", this run's median {statistics.median(found):.2f}" if found else ""
        print(f"least sure: {names}: look at these first (the lowest in this run by summary.csv's probability_mean, "
              f"the mean foreground probability over an image's nuclei{median}; sort summary.csv by it for more)")
    if stats["images"] and not stats["nuclei"]:
        size = f" and min size {settings.min_size} px" if settings.min_size else ""
        print(f"warning: no nucleus in any image at threshold {settings.threshold:g}{size}: is this the right model and "
              f"--channel/--intensity for these images? A lower --threshold{' or --min-size' if size else ''} finds "
              "fainter or smaller nuclei")
    if stats["squashed"]:
        print(f"warning: {len(stats['squashed'])} image(s) (first: {stats['squashed'][0]}) are more than "
              f"{SQUASH_WARNING:g}x larger than the {settings.img_size} px squares this resize-mode model squashes them "
              "into: small nuclei vanish there; a native-resolution model (train.py --mode instance, or the bundled "
              "model) sees them at their own size")
    if stats["unreadable"]:
        bad = stats["unreadable"]
        fail(f"{len(bad)} image{'s' * (len(bad) != 1)} could not be read and {'have' if len(bad) != 1 else 'has'} no "
             f"results (the results of the other {n} are written): {next(iter(bad.values()))}" + (
                 f"; also {', '.join(list(bad)[1:4])}{', ...' if len(bad) > 4 else ''}" if len(bad) > 1 else ""))


def background_line(inverted: dict[str, bool], table: bool) -> str:
    """The closing line when the grey rule inverted some grey images (read their background as bright): how many,
    the first LEAST_SURE by name, and the way out for fluorescence it misread; ``table``: summary.csv is written."""
    from ..inference.folder import LEAST_SURE

    bright = [i for i, v in inverted.items() if v]
    where = " (summary.csv's background column has every image's)" if table else ""
    share = (f"{_count(len(bright), 'grey image')}" if len(bright) == len(inverted) == 1 else
             f"all {_count(len(bright), 'grey image')}" if len(bright) == len(inverted) else
             f"{len(bright)} of {_count(len(inverted), 'grey image')}")
    named = ", ".join(bright[:LEAST_SURE]) + (f" and {len(bright) - LEAST_SURE} more" if len(bright) > LEAST_SURE else "")
    return (f"background: {share} read as bright-background (brightfield) and inverted: {named}{where}; crowded or "
            "overexposed fluorescence can read so too: predict those that are fluorescence again on their own (a "
            "folder of them) with --background dark")


def scale_line(mode: str, scales: dict[str, float], table: bool) -> str:
    """The closing line of ``--scale auto`` or ``certainty``: how many images the network saw resized, by
    which factors, naming the first; ``table``: summary.csv (which has every image's factor) is written."""
    resized = {i: f for i, f in scales.items() if f != 1.0}
    where = "; summary.csv's scale column has every image's factor" if table else ""
    if not resized:
        return f"scale {mode}: {'every image' if len(scales) != 1 else 'the image'} at its own size{where}"
    first = next(iter(resized))
    if len(scales) == 1:
        return f"scale {mode}: the image resized by {resized[first]:.3g}x before the network{where}"
    low, high = min(resized.values()), max(resized.values())
    span = f"{low:.2g}x" if low == high else f"{low:.2g}x to {high:.2g}x"
    rest = ", the others at their own size" if len(resized) < len(scales) else ""
    return (f"scale {mode}: {len(resized)} of {_count(len(scales), 'image')} resized before the network ({span}; first: "
            f"{first} at {resized[first]:.3g}x){rest}{where}")


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one: "1 image", "3 images"."""
    return f"{n} {noun}{'s' * (n != 1)}"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be."""


def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a cluster's time limit) handled as Ctrl-C: the run's staged files are removed.
    Returns the handler it replaced (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise _Terminated

    return signal.signal(signal.SIGTERM, interrupt)


def _check_submission_path(out: str) -> None:
    """``--out`` names the submission CSV: refused unless it ends in .csv, and unless a file already there
    is a submission CSV (one that predict.py would have written), so no other file is ever replaced."""
    from ..data.images import LABELS_CSV

    path = Path(out)
    if path.suffix.lower() != ".csv":
        fail(f"--out {out}: --out names the submission CSV (ImageId,EncodedPixels) and must end in .csv, e.g. "
             "--out submission.csv; the label images go into --out-dir FOLDER (FOLDER/labels/)")
    if path.is_file():
        try:
            with open(path, newline="", encoding="utf-8") as f:
                header = f.readline(64).strip()  # a large file of another kind is not read whole
        except (OSError, UnicodeDecodeError):
            header = ""
        if header != "ImageId,EncodedPixels":
            fail(f"--out {out} exists and is not a submission CSV (its first line is not ImageId,EncodedPixels): "
                 "predict.py replaces only its own results; choose another name, e.g. --out submission.csv")
        if path.name.lower() == LABELS_CSV.lower():  # the truth, in the same format as a submission
            fail(f"--out {out} is the competition's training labels (the truth, not a result of predict.py); choose "
                 "another name, e.g. --out submission.csv")


if __name__ == "__main__":
    main()
