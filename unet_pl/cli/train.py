"""``python scripts/train.py [--gpus N] [--data-dir stage1_train] [--out runs/NAME] ...``

Trains LitUNet as the notebook does (BCE, Adam 1e-3, batch 16, early stopping on the val loss
with patience 5, the best model kept) and writes a run folder: best.ckpt, last.ckpt,
hparams.yaml, command.txt, logs/ (CSV; tensorboard/ too when installed), curves.png and
val_predictions.png. Ctrl-C or SIGTERM leave last.ckpt; --resume last carries on.
"""
from __future__ import annotations

import argparse
import math
import importlib.util
import logging
import os
import re
import shlex
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

from ..data.holdout import HOLDOUTS
from ..data.module import BALANCES, EMPTY_MASKS
from ..data.readers import INTENSITIES, INTENSITY_HELP
from ..data.transforms import PRESETS, zoom_range
from ..geometry import BOUNDARY_TARGETS, HEADS, RESOLUTIONS
from ..optim import OPTIMIZERS
from ..precision import native_bf16
from .common import Parser, fail, flag_names, holdout_arg, quiet_lightning
from .run_folder import draw, summarise, write_run_files

#: Exit statuses: the shell's 128 + signal for an interrupted run (bad usage: common.EXIT_USAGE, 2).
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
PRECISIONS = {"32": "32-true", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}
#: torch.compile modes --compile offers ("default" is torch's default mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
RUN_DIR_ENV = "UNET_PL_RUN_DIR"  # hands the default run folder to the DDP processes Lightning starts
#: What makes a folder a run: train.py refuses to write a new run over any of these.
RUN_FILES = ("best.ckpt", "last.ckpt", "hparams.yaml")
#: Flags of the machine or of this invocation, not of the run: a resumed run takes them from the
#: command line (or their defaults), every other flag from the run it continues.
MACHINE_FLAGS = frozenset({"gpus", "num_nodes", "cpu_processes", "num_workers", "precision", "compile", "cache_dir",
                           "max_time", "out", "resume", "fast_dev_run", "init"})
#: The machine flags the printed resume command repeats when this invocation gave them (the others
#: belong to this invocation alone: its time limit, its run folder, its start).
REPEATED_ON_RESUME = ("gpus", "num_nodes", "cpu_processes", "num_workers", "precision", "compile", "cache_dir")
#: --mode presets: what --resolution, --head, --tune, --intensity, --ema and --augment default to (each flag given explicitly wins).
MODES = {
    # the 2018 notebook (with flips and rotations, which it did not have: --augment none)
    "notebook": {"resolution": "resize", "head": "mask", "tune": "off", "intensity": "fixed", "ema": 0.0, "augment": "default"},
    # native crops, boundary head, watershed, post-processing tuned, each image's contrast stretched,
    # the weights' moving average kept (docs/accuracy.md: steadier across seeds on the grouped validation),
    # grain, speckle or blur on half the crops (docs/accuracy.md: +0.010 pooled over two seeds there),
    # grey with bright backgrounds inverted (docs/accuracy.md: the same pooled score, colour tissue +0.06,
    # brightfield +0.10, fluorescence -0.015, over two seeds)
    "instance": {"resolution": "native", "head": "mask+boundary", "tune": "on", "intensity": "grey", "ema": 0.995,
                 "augment": "texture"},
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train.py", description=__doc__.split("\n\n")[1])
    hw = p.add_argument_group("hardware")
    hw.add_argument("--gpus", type=int, default=None,
                    help="0: the CPU; 1: one CUDA GPU; N > 1: DDP on N GPUs per node. Default: 1 when CUDA is visible, else 0")
    hw.add_argument("--num-nodes", type=int, default=1, help="machines for DDP (launch with torchrun or SLURM on each)")
    hw.add_argument("--cpu-processes", type=int, default=1, help="with --gpus 0: DDP over this many CPU processes (gloo); for testing DDP")
    hw.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                    help="auto (default): bf16-mixed where the hardware computes bfloat16 natively (Ampere+ GPUs; "
                         "CPUs with AVX512-BF16 or AMX), else 32; 32: float32 as the notebook; bf16-mixed: autocast to "
                         "bfloat16; 16-mixed: float16 + loss scaling (GPU only)")
    hw.add_argument("--num-workers", type=int, default=None,
                    help="DataLoader processes per training process. Default: 0 on the CPU (loading in the training "
                         "process: 9%% faster on 2 cores, where workers compete with the training threads), "
                         "min(8, cores per GPU - 1) with GPUs")
    hw.add_argument("--compile", choices=("off", *COMPILE_MODES), default="off",
                    help="torch.compile the U-Net. GPU: reduce-overhead (CUDA graphs) removes the kernel-launch cost "
                         "that bounds small batches (see the README's performance section); CPU: slower, leave off")
    hw.add_argument("--deterministic", action="store_true",
                    help="deterministic algorithms (Trainer(deterministic=True)): same seed, same weights; "
                         "bit-exact across --resume too (augmentation is seeded per epoch and image)")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="stage1_train-style folder (<id>/images, <id>/masks), or images/ + masks/ (or labels/) label "
                           "images of the same names. Default: the bundled sample")
    data.add_argument("--img-size", type=int, default=128, help="images and masks are resized to this square side, as in the notebook")
    data.add_argument("--val-split", type=float, default=0.1, help="fraction of images held out for validation, as in the notebook")
    data.add_argument("--augment", choices=PRESETS, default=None,
                      help="training augmentation (unet_pl.data.transforms): default = flips/rotations; none = the notebook; "
                           "colour = also hue, channel, grey and gamma changes for unseen stains; scale = also nuclei "
                           "at 0.67-1.5x (native resolution only); colour+scale = both; stain = also H&E stain variation of colour "
                           "images (albumentations' HEStain); texture = also grain, speckle or blur of the image; texture+touch = "
                           "texture and synthetic touching nuclei (a nucleus copied and pressed against itself). "
                           "Default: from --mode (default for notebook, texture for instance)")
    data.add_argument("--channel", type=int, default=None, metavar="N",
                      help="multi-channel files (ImageJ hyperstacks, OME-TIFF): the nuclear channel, counted from 1 as "
                           "Fiji does. Default: grey or RGB as stored; files with channels (2 or more, three stains are not RGB) need it")
    data.add_argument("--intensity", choices=INTENSITIES, default=None,
                      help=f"{INTENSITY_HELP}. Default: from --mode (fixed for notebook, grey for instance); saved in "
                           "the checkpoint, predict.py applies it")
    data.add_argument("--balance", choices=BALANCES, default="none",
                      help="none: every training image once an epoch (the notebook); modality: an epoch draws as many "
                           "images with replacement, each kind (fluorescence, brightfield, histology) in proportion to "
                           "the square root of its image count, so rare kinds are seen more often")
    data.add_argument("--labels-csv", default=None, metavar="PATH",
                      help="masks from this stage1_train_labels.csv (run-length rows) instead of the masks/ folders")
    data.add_argument("--empty-masks", choices=EMPTY_MASKS, default="error",
                      help="error: an image without masks stops the run (a missing download, usually); background: train on it as all background")
    data.add_argument("--cache-dir", default=None, help="where decoded, resized images are cached. Default: the per-user cache")
    data.add_argument("--holdout", choices=HOLDOUTS, type=holdout_arg, default="none",
                      help="stratified: never train or validate on the fixed, modality-stratified 10%% hold-out "
                           "(unet_pl.data.holdout); group:k/K: nor on fold k of K of the grouped cross-validation, "
                           "whole acquisition groups (unet_pl.data.groups; crossval.py runs every fold); "
                           "predict.py and evaluate.py with the same --holdout score them")
    beyond = p.add_argument_group("beyond the notebook")
    beyond.add_argument("--mode", choices=tuple(MODES), default="notebook",
                        help="notebook: resized squares, one output, connected components (the 2018 notebook); "
                             "instance: native-resolution crops and a boundary output split by a watershed (the "
                             "recipe, and the bundled model's mode: the better choice for your own images)")
    beyond.add_argument("--resolution", choices=RESOLUTIONS, default=None,
                        help="resize: images squashed to --img-size squares (the notebook); native: random --crop-size "
                             "crops of the full-size images, prediction on whole images. Default: from --mode")
    beyond.add_argument("--crop-size", type=int, default=128,
                        help="--resolution native: side of the random training crops (the same pixels per step as the notebook's 128 squares)")
    beyond.add_argument("--head", choices=tuple(HEADS), default=None,
                        help="mask: one output, the foreground (the notebook); mask+boundary: a second output, each "
                             "nucleus' boundary, which predict.py uses to split touching nuclei; mask+boundary+distance: "
                             "a third, each pixel's depth in its nucleus (the watershed's seeds need a high one). "
                             "Default: from --mode")
    beyond.add_argument("--contact-weight", type=float, default=0.0,
                        help="boundary heads: the loss counts 1 + this many times where two nuclei touch (within 2 px), "
                             "so the network learns to cut them apart; 0: off")
    beyond.add_argument("--boundary-target", choices=BOUNDARY_TARGETS, default="ring",
                        help="boundary heads: what the boundary output learns: ring, each nucleus' outermost pixels; "
                             "ring+contact, also every pixel within 2 px of two nuclei (a wider line where they touch)")
    beyond.add_argument("--dice-weight", type=float, default=0.0,
                        help="add this many times (1 - soft Dice) of the foreground output to the loss (BCE + Dice, as "
                             "many DSB 2018 entries trained); 0: BCE alone, the notebook's loss")
    beyond.add_argument("--lovasz-weight", type=float, default=0.0,
                        help="add this many times the Lovász hinge of the foreground output to the loss (the convex "
                             "surrogate of 1 - IoU that DSB 2018 and TGS Salt entries trained with); 0: off")
    beyond.add_argument("--ema", type=float, default=None, metavar="DECAY",
                        help="validate, keep and predict with an exponential moving average of the weights, updated "
                             "every step with this decay (0.995: about the last 200 steps); 0: off. Default: from --mode "
                             "(notebook 0, instance 0.995)")
    beyond.add_argument("--tune", choices=("on", "off"), default=None,
                        help="on: at the end, choose the threshold, watershed seed threshold and minimum nucleus size "
                             "on the validation images by the competition score and store them in the checkpoints "
                             "(predict.py's defaults); off: the notebook's 0.5, no size filter. Default: from --mode")
    fit = p.add_argument_group("optimisation")
    fit.add_argument("--epochs", type=int, default=50, help="maximum epochs, as in the notebook")
    fit.add_argument("--batch-size", type=int, default=16, help="images per step per process, as in the notebook")
    fit.add_argument("--lr", type=float, default=1e-3, help="learning rate (Keras Adam's default)")
    fit.add_argument("--l2", type=float, default=0.0,
                     help="Keras l2(w) coefficient on every conv kernel; applied as weight_decay = 2*w (0: the notebook)")
    fit.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                     help="adam: coupled (exactly Keras' L2); adamw: decoupled decay; sgd: momentum 0.9")
    fit.add_argument("--lr-schedule", choices=("constant", "plateau", "cosine"), default="constant",
                     help="constant: --lr throughout (the notebook); plateau: the learning rate x0.3 after 3 epochs in a "
                          "row without a lower val/loss, down to --lr / 100 (give --patience above 3); cosine: from --lr "
                          "to almost 0 over --epochs")
    fit.add_argument("--patience", type=int, default=5, help="early stopping after this many epochs without a lower val/loss; 0: off")
    fit.add_argument("--seed", type=int, default=42, help="seeds torch, numpy, python and DataLoader workers")
    fit.add_argument("--max-time", default=None, help="stop after this much training time, DD:HH:MM:SS (e.g. 00:02:00:00)")
    fit.add_argument("--fast-dev-run", action="store_true", help="one batch of training and validation, no checkpoints or logs: a smoke test")
    run = p.add_argument_group("run folder")
    run.add_argument("--out", default=None, help="run folder. Default: runs/<timestamp>, or the folder of the --resume checkpoint")
    run.add_argument("--init", default=None, metavar="PATH|pretrained",
                     help="start from these weights instead of random ones (fine-tuning): a run's best.ckpt, or "
                          "'pretrained', the bundled model (and then --mode instance, its mode, unless --mode says "
                          "otherwise). The run is new: its optimizer, epochs and early stopping start afresh")
    run.add_argument("--resume", default=None, metavar="PATH|last",
                     help="continue from a checkpoint (optimizer, epoch, early stopping); 'last': the run folder's last.ckpt "
                          "(--out RUN; without --out, the most recently written runs/*/last.ckpt, named as it starts)")
    return p


class _SaidInSummary:
    """A logging filter that drops the tuner's line: the closing summary gives it, with the values for the cut."""

    @staticmethod
    def filter(record) -> bool:
        from ..callbacks import TUNED_LINE

        return not str(record.msg).startswith(TUNED_LINE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check argv; every mistake exits with status 2 and one line on stderr."""
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.init is not None and args.resume is not None:
        fail("--init starts a new run from a checkpoint's weights, --resume continues a run: give one of them")
    given = given_flags(argv)
    args.restored = restore_run_flags(args, given) if args.resume else None
    # what the resume command must repeat (a resume takes machine flags from its own command line)
    args.again = [word for dest in REPEATED_ON_RESUME if dest in given for word in (f"--{dest.replace('_', '-')}", str(getattr(args, dest)))]
    if args.init == "pretrained" and "mode" not in given:
        args.mode = "instance"  # the bundled model's mode: its head, resolution and intensity rule
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.crop_size < 32 or args.crop_size % 16:
        fail(f"--crop-size must be a multiple of 16, at least 32, got {args.crop_size}")
    for name in ("epochs", "batch_size", "img_size", "num_nodes", "cpu_processes"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.contact_weight) and args.contact_weight >= 0):
        fail(f"--contact-weight must be a number >= 0, got {args.contact_weight}")
    if args.contact_weight and HEADS[args.head] < 2:
        fail(f"--contact-weight {args.contact_weight} needs the boundary head (--mode instance or --head mask+boundary)")
    if args.boundary_target != "ring" and HEADS[args.head] < 2:
        fail(f"--boundary-target {args.boundary_target} needs the boundary head (--mode instance or --head mask+boundary)")
    if not (math.isfinite(args.dice_weight) and args.dice_weight >= 0):
        fail(f"--dice-weight must be a number >= 0, got {args.dice_weight}")
    if not (math.isfinite(args.lovasz_weight) and args.lovasz_weight >= 0):
        fail(f"--lovasz-weight must be a number >= 0, got {args.lovasz_weight}")
    if not (math.isfinite(args.ema) and 0 <= args.ema < 1):
        fail(f"--ema must be a decay in [0, 1) such as 0.995 (0: off), got {args.ema}")
    if zoom_range(args.augment) is not None and args.resolution != "native":
        fail(f"--augment {args.augment} changes the crops' magnification, which needs --resolution native "
             "(or --mode instance); resized squares have no nucleus size to keep")
    if args.compile != "off" and args.resolution == "native":
        fail("--compile needs fixed image sizes: use it with --resolution resize (native validation images vary in size)")
    for flag, value, ok, want in (("--num-workers", args.num_workers, args.num_workers is None or args.num_workers >= 0, ">= 0"),
                                  ("--patience", args.patience, args.patience >= 0, ">= 0 (0: no early stopping)"),
                                  ("--l2", args.l2, math.isfinite(args.l2) and args.l2 >= 0, ">= 0 (0: none)"),
                                  ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "> 0, e.g. 1e-3")):
        if not ok:
            fail(f"{flag} must be {want}, got {value}")
    if not 0.0 < args.val_split < 1.0:
        fail(f"--val-split must lie strictly between 0 and 1, got {args.val_split}")
    if args.max_time is not None and not re.fullmatch(r"\d{1,2}:\d{2}:\d{2}:\d{2}", args.max_time):
        fail(f"--max-time {args.max_time!r} must be DD:HH:MM:SS, e.g. 00:02:00:00 for two hours")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        from ..data.images import TRAIN_LAYOUTS

        what = "is a file; train.py takes a folder:" if Path(args.data_dir).is_file() else "does not exist; pass"
        fail(f"--data-dir {args.data_dir} {what} {TRAIN_LAYOUTS}")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.gpus_defaulted = args.gpus is None
    if args.gpus is None:
        args.gpus = 1 if visible else 0
    if args.gpus < 0:
        fail(f"--gpus must be >= 0, got {args.gpus}")
    if args.gpus > 0 and visible == 0:
        fail(f"--gpus {args.gpus} asks for {args.gpus} CUDA GPU{'s' if args.gpus > 1 else ''} but no CUDA device is visible; use --gpus 0 to train on the CPU")
    if args.gpus > visible:
        fail(f"--gpus {args.gpus} asks for {args.gpus} GPUs but only {visible} CUDA device{'s are' if visible > 1 else ' is'} visible")
    if args.gpus > 0 and args.cpu_processes > 1:
        fail("--cpu-processes is for --gpus 0 (DDP on the CPU); with GPUs, --gpus N sets the processes")
    if args.precision == "auto":
        args.precision = "bf16-mixed" if native_bf16(args.gpus > 0) else "32"
    if args.num_workers is None:
        from ..data import default_workers

        args.num_workers = default_workers(args.gpus)
    if args.gpus == 0 and args.precision == "16-mixed":
        fail("--precision 16-mixed needs a CUDA GPU; on the CPU use --precision bf16-mixed or 32")
    return args


def given_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags ``argv`` names (not those left at their defaults)."""
    parser, unset = build_parser(), object()
    # argparse leaves attributes the namespace already has alone unless their flag is given
    marked = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args([]))})
    return {dest for dest, value in vars(parser.parse_args(argv, namespace=marked)).items() if value is not unset}


def resume_checkpoint(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """The run folder (None: not chosen yet) and the checkpoint ``--resume`` names (None: a fresh run)."""
    out = Path(args.out) if args.out else None
    if out is None and os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK"):
        out = Path(os.environ[RUN_DIR_ENV])  # a DDP process started by Lightning: rank zero chose it
    ckpt = None
    if args.resume == "last":
        if out is None:
            found = sorted(Path("runs").glob("*/last.ckpt"), key=lambda p: p.stat().st_mtime)
            if not found:
                fail("--resume last found no runs/*/last.ckpt; name the run folder with --out or give the checkpoint's path")
            out = found[-1].parent
        ckpt = out / "last.ckpt"
    elif args.resume:
        ckpt = Path(args.resume)
        out = out or ckpt.parent
    if ckpt is not None and not ckpt.is_file():
        fail(f"--resume: no checkpoint at {ckpt}")
    return out, ckpt


def read_resume_checkpoint(ckpt: Path) -> dict:
    """The checkpoint ``--resume`` names, read with weights_only (it cannot run code); refused in one
    line when it cannot be read or holds weights only."""
    from ..inference.checkpoint import read_checkpoint

    try:
        full = read_checkpoint(ckpt)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--resume: {e}")
    if "optimizer_states" not in full or "loops" not in full:  # unet-export's output, the bundled pretrained model
        fail(f"--resume {ckpt}: it holds weights only (no optimizer or loop state), so there is no run to continue; "
             "train anew without --resume, or resume from a run's last.ckpt (predict.py --ckpt uses this file as it is)")
    return full


def saved_run_flags(ckpt: Path, full: dict) -> tuple[dict, str]:
    """The flags the checkpoint's run was started with, and where they were read: the run folder's
    hparams.yaml (every flag), else the checkpoint ``full``'s own hyperparameters (the data module's
    and the model's, under their flag names)."""
    import yaml

    saved = ckpt.parent / "hparams.yaml"
    if saved.is_file():
        try:
            cli = (yaml.safe_load(saved.read_text()) or {}).get("cli")
        except (OSError, yaml.YAMLError, AttributeError):
            cli = None
        if isinstance(cli, dict):
            return cli, str(saved)
    model, data = full.get("hyper_parameters") or {}, full.get("datamodule_hyper_parameters") or {}
    flags = {k: data[k] for k in ("data_dir", "val_split", "batch_size", "seed", "labels_csv", "empty_masks", "head",
                                  "holdout", "resolution", "channel", "intensity", "balance", "augment") if k in data}
    if not isinstance(flags.get("labels_csv"), str):  # True: the CSV beside the folder, which --labels-csv cannot say
        flags.pop("labels_csv", None)
    flags |= {k: model[k] for k in ("lr", "l2", "optimizer", "lr_schedule", "contact_weight", "boundary_target",
                                    "dice_weight", "lovasz_weight", "ema", "head", "resolution") if k in model}
    if "tune" in model and model["tune"] is not None:
        flags["tune"] = "on" if model["tune"] else "off"
    if model.get("lr_schedule") == "cosine" and model.get("schedule_epochs"):
        flags["epochs"] = model["schedule_epochs"]
    side = data.get("img_size", model.get("img_size"))
    if side is not None:
        flags["crop_size" if flags.get("resolution") == "native" else "img_size"] = side
    return flags, f"{ckpt} (no hparams.yaml beside it)"


def restore_run_flags(args: argparse.Namespace, given: set[str]) -> tuple[str, list[str], dict]:
    """Set every flag of the run ``--resume`` continues that this command does not give (machine flags
    aside: ``MACHINE_FLAGS``), so that ``--resume last --out RUN`` alone trains on as the run did. A
    ``--mode`` given now other than the run's counts as giving the flags it presets. The saved values
    go through the parser again (its types and choices), so a hand-edited hparams.yaml is one line
    when wrong. Returns where the flags were read, the flags given now that differ from the run's,
    and the checkpoint read (for ``check_resume``). The run folder and checkpoint found are kept in
    ``args.resolved_run`` (found once)."""
    out, ckpt = resolve_run_dir(args)  # its checks (a writable folder, not another run's) come first
    args.resolved_run = (out, ckpt)
    full = read_resume_checkpoint(ckpt)
    saved, source = saved_run_flags(ckpt, full)
    taken = set(given)
    if "mode" in given and saved.get("mode") != args.mode:  # unknown (a checkpoint alone) or another mode
        taken |= set(MODES[args.mode])
    keys = [k for k in saved if k in vars(args) and k not in MACHINE_FLAGS and k not in taken]
    restored = _reparse(saved, keys, source)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run: {saved[k]})" for k in sorted(given)
               if k in saved and k not in MACHINE_FLAGS and saved[k] != getattr(args, k)]
    for key in keys:
        setattr(args, key, restored[key])
    data_dir = getattr(args, "data_dir", None)
    if "data_dir" not in given and data_dir is not None and not Path(data_dir).is_dir():
        fail(f"--resume: the run trained on --data-dir {data_dir} (from {source}), which is not a folder from here; "
             "pass --data-dir with the same images")
    return source, changed, full


def _reparse(saved: dict, keys: list[str], source: str) -> dict:
    """``saved[key]`` for each key, read back through train.py's parser as if typed on the command line."""
    parser = build_parser()
    parser.error = lambda message: fail(f"--resume: {source} holds a value train.py does not take ({message}); "
                                        "fix that line, or give the flag on the command line")
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    argv = []
    for key in keys:
        action, value = flags[key], saved[key]
        if value is None:
            continue
        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                parser.error(f"{action.option_strings[0]}: expected true or false, got {value!r}")
            argv += [action.option_strings[0]] if value else []
        else:
            argv += [action.option_strings[0], str(value)]
    parsed = vars(parser.parse_args(argv))
    return {key: parsed[key] if saved[key] is not None else None for key in keys}


def resolve_run_dir(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None for a fresh run)."""
    out, ckpt = resume_checkpoint(args)
    if out is None:
        out = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    # Only the first process checks: the others of a DDP run (Lightning's or torchrun's) start while
    # it writes the run folder.
    first = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    data = Path(args.data_dir).expanduser().resolve() if args.data_dir else None
    if ckpt is None and data is not None and (out.resolve() == data or data in out.resolve().parents):
        fail(f"--out {out} is inside the training folder {args.data_dir}: train.py never writes there (a run folder "
             "among the images is one more folder to list, and its files could be taken for data); pass --out a "
             "folder outside it, e.g. --out runs/NAME")
    if ckpt is None and first and not args.fast_dev_run:
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held:
            fail(f"--out {out} already holds a run ({', '.join(held)}); continue it with --resume last --out {shlex.quote(str(out))}, "
                 "or pass another --out (nothing was changed)")
    if first and not args.fast_dev_run:  # a fresh run makes the folder; a resumed one writes its checkpoints there
        writable = next(p for p in (out, *out.parents) if p.exists())
        if not writable.is_dir() or not os.access(writable, os.W_OK | os.X_OK):
            fail(f"cannot {'create' if ckpt is None else 'write into'} the run folder {out}: {writable} is not writable; "
                 "pass --out a folder you can write to")
    if ckpt is not None and first and not args.fast_dev_run and args.out and out.resolve() != ckpt.parent.resolve():
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held:  # the resumed run would replace another run's files
            fail(f"--out {out} already holds another run ({', '.join(held)}) than the one {ckpt} comes from; leave "
                 f"--out out to continue in {ckpt.parent}, or pass an --out that holds no run (nothing was changed)")
    return out, ckpt


def side(args: argparse.Namespace) -> int:
    """The side the network trains on: --crop-size for native resolution, --img-size for resized squares."""
    return args.crop_size if args.resolution == "native" else args.img_size


def make_datamodule(args: argparse.Namespace):
    from ..data import NucleiDataModule

    return NucleiDataModule(data_dir=args.data_dir, resolution=args.resolution, img_size=side(args), head=args.head,
                            val_split=args.val_split, batch_size=args.batch_size, num_workers=args.num_workers,
                            seed=args.seed, augment=args.augment, cache_dir=args.cache_dir, holdout=args.holdout,
                            labels_csv=args.labels_csv, empty_masks=args.empty_masks, channel=args.channel,
                            intensity=args.intensity, balance=args.balance)


def make_model(args: argparse.Namespace):
    from ..lit import LitUNet

    model = LitUNet(lr=args.lr, l2=args.l2, optimizer=args.optimizer, lr_schedule=args.lr_schedule,
                    schedule_epochs=args.epochs if args.lr_schedule == "cosine" else None, img_size=side(args), head=args.head,
                    contact_weight=args.contact_weight, boundary_target=args.boundary_target, dice_weight=args.dice_weight, lovasz_weight=args.lovasz_weight, ema=args.ema,
                    tune=args.tune == "on",
                    resolution=args.resolution, channel=args.channel, intensity=args.intensity)
    if args.compile != "off":
        # in place: the parameters keep their names, so checkpoints load without torch.compile
        model.unet.compile(mode=None if args.compile == "default" else args.compile)
    return model


def init_name(args: argparse.Namespace) -> str:
    """What ``--init`` started from, for messages."""
    return "the bundled model" if args.init == "pretrained" else str(args.init)


def starting_score(model, datamodule, args: argparse.Namespace) -> dict[str, float]:
    """``--init``: the starting weights' val/loss and val/iou on this run's validation images, before the first
    step (a Trainer of its own, in the run's arithmetic, without its callbacks, logger or checkpoints)."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="gpu" if args.gpus > 0 else "cpu", devices=1, precision=PRECISIONS[args.precision],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False)  # no inference tensors left in the model's metrics for the fit after it
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items() if k in ("val/loss", "val/iou")}


def worse_than_start(start: dict[str, float], checkpoint, name: str) -> str | None:
    """The warning when no epoch's val/loss (what best.ckpt is chosen by) is below the starting weights' ``start``."""
    best = checkpoint.best_model_score
    if best is None or "val/loss" not in start or float(best) < start["val/loss"]:
        return None
    return (f"warning: fine-tuning did not help on these validation images: {name} itself scored val/loss "
            f"{start['val/loss']:.4f} before the first step, and no epoch did better (best.ckpt: {float(best):.4f}); "
            "predict with the starting model (predict.py without --ckpt for the bundled model), or try a lower --lr "
            "(e.g. --lr 1e-4) or more annotated images")


def init_weights(model, args: argparse.Namespace, say) -> list[str]:
    """``--init``: the U-Net's weights from a checkpoint (read with weights_only: it cannot run code),
    refused in one line when its shape differs (saying the flags that fit); a note when it read its
    images another way than this run will. Returns the ids its run held out (empty when it saved none)."""
    from ..inference.checkpoint import PRETRAINED, read_checkpoint, unet_state_dict

    path = PRETRAINED if args.init == "pretrained" else Path(args.init)
    try:
        full = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--init: {e}")
    hp = full.get("hyper_parameters") or {}
    name = init_name(args)
    mine = dict(model.hparams)
    for key in ("in_channels", "out_channels", "base_filters"):
        if key in hp and hp[key] != mine.get(key):
            hint = f": it was trained with --head {hp['head']}" if key == "out_channels" and hp.get("head") else ""
            hint += " (--mode instance)" if hint and hp.get("head") == "mask+boundary" else ""
            fail(f"--init {args.init}: {name}'s {key} is {hp[key]}, this run's {mine.get(key)}{hint}; pass the flags "
                 "it was trained with, or train without --init")
    try:
        model.unet.load_state_dict(unet_state_dict(full))
    except RuntimeError as e:
        fail(f"--init {args.init}: its weights do not fit this run's U-Net ({str(e).splitlines()[0][:120]})")
    differ = [f"--{k.replace('_', '-')} {hp[k]}" for k in ("resolution", "intensity", "channel")
              if hp.get(k) is not None and hp.get(k) != mine.get(k)]
    say(f"starting from the weights of {name}" + (f"; note: it was trained with {', '.join(differ)}, which this run "
                                                  "does not use: it sees the images differently" if differ else ""))
    return list((full.get("NucleiDataModule") or {}).get("holdout_ids") or [])


def seen_by_start(held_out: list[str], ids, start_held_out: list[str]) -> int:
    """How many of this run's held-out images the ``--init`` model was likely trained on: where this run's images
    include some the starting model's run held out (the same data, e.g. stage1_train), those of this run's
    hold-out that its run did not hold out (0 where the images are the user's own)."""
    theirs = set(start_held_out)
    if not theirs or not theirs & set(map(str, ids)):
        return 0
    return sum(i not in theirs for i in held_out)


def check_resume(ckpt: Path, model, say, epochs: int | None = None, patience: int | None = None,
                 full: dict | None = None) -> None:
    """Refuse a checkpoint of another shape (saying which flags would fit it), one already past
    ``epochs`` or one that early stopping ended and would end again at ``patience``; note the flags
    that differ from the checkpoint's. ``full``: the checkpoint already read (else it is read here,
    with weights_only: it cannot run code)."""
    full = read_resume_checkpoint(ckpt) if full is None else full
    try:  # epochs whose training steps are done (the last one's validation may still be to come)
        done = int(full["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        done = None
    if epochs is not None and done is not None and epochs <= done:
        fail(f"--resume {ckpt}: the run has trained {done} epoch{'s' if done != 1 else ''} and --epochs is {epochs}, so "
             f"nothing is left to train; pass --epochs above {done} to train on")
    stopping = next((v for k, v in (full.get("callbacks") or {}).items() if k.startswith("EarlyStopping")), None)
    if patience and isinstance(stopping, dict) and stopping.get("stopped_epoch") and stopping.get("wait_count", 0) >= patience:
        fail(f"--resume {ckpt}: the run stopped early after epoch {stopping['stopped_epoch']} ({stopping['wait_count']} "
             f"epochs without a lower val/loss) and --patience is {patience}, so it would stop again at once; pass a "
             f"larger --patience (or 0: no early stopping) to train on")
    # checkpoints from before --ema: off; from before --lr-schedule: constant
    saved = {"ema": 0.0, "lr_schedule": "constant", "schedule_epochs": None, **full.get("hyper_parameters", {})}
    differ = {k: (saved[k], v) for k, v in model.hparams.items() if k in saved and saved[k] != v and k not in ("postprocess", "tune", "tune_score")}
    shape = {"in_channels", "out_channels", "base_filters"} & set(differ)
    if shape:
        hint = ""
        if "out_channels" in shape and saved.get("head"):
            hint = f"; it was trained with --head {saved['head']}" + (" (--mode instance)" if saved["head"] == "mask+boundary" else "")
        fail(f"--resume {ckpt}: the checkpoint's model has a different {', '.join(sorted(shape))}{hint}")
    if "cosine" in (saved.get("lr_schedule"), model.hparams.get("lr_schedule")) and (
            "lr_schedule" in differ or "schedule_epochs" in differ):
        was = f"--lr-schedule {saved.get('lr_schedule', 'constant')}" + (
            f" --epochs {saved['schedule_epochs']}" if saved.get("lr_schedule") == "cosine" else "")
        fail(f"--resume {ckpt}: its run trained with {was}; a cosine decay spans the run's epochs, so resume with the "
             "same --lr-schedule and --epochs (or train anew)")
    for k, (was, now) in differ.items():
        say(f"note: {k} is {now} now but {was} in {ckpt.name}; the checkpoint's optimizer state (its learning rate too) is restored")


def make_trainer(args: argparse.Namespace, out: Path, callbacks: list):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from ..callbacks import PatientEarlyStopping, RngStateInCheckpoint, SaveOnInterrupt, Throughput

    gpu = args.gpus > 0
    devices = args.gpus if gpu else args.cpu_processes
    checkpoint = ModelCheckpoint(dirpath=out, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                                 auto_insert_metric_name=False, enable_version_counter=False)
    # last.ckpt at the end of every epoch, after its validation and early stopping's check (so a resume knows
    # the run stopped): Lightning's save_last writes it only when best.ckpt changes, so a run whose loss
    # stopped falling would resume epochs back. Not in a fast dev run (its one step would leave a last.ckpt).
    latest = [] if args.fast_dev_run else [ModelCheckpoint(dirpath=out, filename="last", monitor=None, save_top_k=1,
                                                            save_on_train_epoch_end=True, enable_version_counter=False)]
    interrupt, throughput = SaveOnInterrupt(out / "last.ckpt"), Throughput()
    # Redrawing the bar reads the step loss from the device; every 10 steps keeps a GPU from waiting on it.
    bar = TQDMProgressBar(refresh_rate=10)
    # + LitUNet's own: KeepFreedMemory, AdaptiveThreads and, with --tune on (its tune=True), TunePostprocessing
    cbs = [checkpoint, *latest, interrupt, throughput, RngStateInCheckpoint(), bar, *callbacks]
    if args.patience > 0:
        cbs.append(PatientEarlyStopping(monitor="val/loss", mode="min", patience=args.patience))
    loggers = [CSVLogger(out, name="logs")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(out, name="tensorboard", default_hp_metric=False))
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=devices,
        num_nodes=args.num_nodes,
        strategy="ddp" if devices * args.num_nodes > 1 else "auto",
        precision=PRECISIONS[args.precision],
        max_epochs=args.epochs,
        max_time=args.max_time,
        fast_dev_run=args.fast_dev_run,
        deterministic=args.deterministic,
        benchmark=gpu and not args.deterministic,  # cuDNN picks the fastest conv algorithms for our fixed sizes
        callbacks=cbs,
        logger=loggers,
        default_root_dir=out,
        log_every_n_steps=10,
    )
    return trainer, checkpoint, interrupt, throughput


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> None:
    """Train from ``argv`` (default ``sys.argv[1:]``). ``callbacks``: extra Lightning callbacks (tests).

    Exits 2 on bad flags, 143 after SIGTERM and 130 after Ctrl-C (last.ckpt is kept), returns on success.
    """
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lightning_log.addFilter(_SaidInSummary)  # for this run only: a fit in the same process afterwards says it again
    try:
        _train(argv, callbacks)
    finally:
        lightning_log.removeFilter(_SaidInSummary)


def _train(argv: list[str] | None, callbacks: tuple) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    say = rank_zero_only(print)
    # Expected here, so noise: the run folder already holds command.txt (the warning about
    # on_after_batch_transfer, where the uint8 -> float conversion lives by design, unet_pl.lit filters).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    quiet_lightning()  # its advertising and its own deprecations: not the user's to act on
    if args.gpus == 0 and args.num_workers == 0:  # on purpose: see default_workers
        warnings.filterwarnings("ignore", message=r".*does not have many workers")
    out, ckpt = getattr(args, "resolved_run", None) or resolve_run_dir(args)
    if args.gpus_defaulted:
        say("no --gpus given: " + ("CUDA is visible, training on 1 GPU (--gpus 0 for the CPU)" if args.gpus else "no CUDA device visible, training on the CPU"))
    if args.gpus > 0 and not args.deterministic:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; convolutions follow cuDNN's default
    pl.seed_everything(args.seed, workers=True, verbose=False)
    try:
        model = make_model(args)
        datamodule = make_datamodule(args)
    except (ValueError, FileNotFoundError) as e:  # the model and data module check their arguments: user input
        fail(flag_names(str(e)))
    start_held_out = init_weights(model, args, say) if args.init is not None else []
    if ckpt is not None:
        source, changed, full = args.restored
        say(f"resuming with the flags of the run in {source}" + ("; given now instead: " + ", ".join(changed) if changed else ""))
        check_resume(ckpt, model, say, epochs=args.epochs, patience=args.patience, full=full)
    trainer, checkpoint, interrupt, throughput = make_trainer(args, out, list(callbacks))
    if trainer.world_size > 1:
        os.environ[RUN_DIR_ENV] = str(out)
    if trainer.world_size == 1:
        # decode (or find) the cache before the Trainer starts, so a bad data folder is one line, not a traceback
        try:
            datamodule.prepare_data()
            datamodule.setup("fit")  # the split, so too few images is one line too, before the run folder
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
    if trainer.is_global_zero and not args.fast_dev_run:  # a smoke test leaves nothing behind
        write_run_files(out, args, argv, model)
        say(f"run folder {out}" + (f", resuming from {ckpt}" if ckpt else ""))
    if start_held_out and args.holdout != "none" and trainer.world_size == 1:
        seen = seen_by_start(datamodule.holdout_ids, datamodule.arrays["ids"], start_held_out)
        if seen:
            say(f"warning: {init_name(args)} was trained on {seen} of this run's {len(datamodule.holdout_ids)} held-out "
                "images (its own run did not hold them out): their scores overstate what the model does on new images; "
                "score on images neither run trained on")
    start_score = {}
    if args.init is not None and trainer.world_size == 1 and not args.fast_dev_run:
        start_score = starting_score(model, datamodule, args)
        say("the starting weights on the validation images: " + ", ".join(f"{k} {v:.4f}" for k, v in start_score.items()))
    start = time.perf_counter()
    exit_code = 0
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except SystemExit:  # Lightning ends SIGTERM with SIGTERMException, Ctrl-C with sys.exit(1)
        if not interrupt.signal:
            raise
        exit_code = EXIT_SIGTERM if interrupt.signal == "SIGTERM" else EXIT_SIGINT
    wall = time.perf_counter() - start
    if not trainer.is_global_zero:
        raise SystemExit(exit_code)
    pictures = [] if args.fast_dev_run else draw(out, datamodule, checkpoint, model, say)
    say(summarise(out, args, trainer, checkpoint, interrupt, throughput, wall, pictures))
    worse = worse_than_start(start_score, checkpoint, init_name(args)) if start_score and not interrupt.signal else None
    if worse:
        say(worse)
    if exit_code:
        raise SystemExit(exit_code)


if __name__ == "__main__":
    main()
