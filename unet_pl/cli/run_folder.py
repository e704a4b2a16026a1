"""The run folder train.py writes: command.txt and hparams.yaml before training, the pictures
(curves.png, val_predictions.png) and the closing summary after it."""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path


def write_run_files(out: Path, args: argparse.Namespace, argv: list[str], model) -> None:
    """command.txt (appended: a resumed folder keeps every command) and hparams.yaml (CLI, model, versions)."""
    import lightning
    import torch
    import yaml

    from ..atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "command.txt", "a") as f:
        f.write(shlex.join([*_program(), *argv]) + "\n")
    cli = {k: v for k, v in vars(args).items() if k not in ("gpus_defaulted", "restored", "resolved_run", "again")}
    for key in ("data_dir", "labels_csv", "cache_dir"):  # absolute: --resume from another folder finds them
        if isinstance(cli.get(key), str):
            cli[key] = str(Path(cli[key]).expanduser().resolve())
    info = {"cli": cli, "model": dict(model.hparams), "versions": {"torch": str(torch.__version__), "lightning": str(lightning.__version__)}}
    # whole or not at all: processes of a multi-node resume read it while starting
    atomic_write(out / "hparams.yaml", lambda f: f.write(yaml.safe_dump(_plain(info), sort_keys=False).encode()))


def _program() -> list[str]:
    """How this process was started: ``python scripts/train.py``, ``python -m unet_pl.cli.train`` or
    ``unet-train`` (pip's console script)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return [_python(), "-m", spec.name]
    if sys.argv and Path(sys.argv[0]).name.startswith("unet-"):
        return [Path(sys.argv[0]).name]
    return [_python(), sys.argv[0]] if sys.argv and sys.argv[0] and sys.argv[0] != "-c" else ["train.py"]


def sibling(tool: str) -> str:
    """The command that runs unet_pl's ``tool`` (``predict``, ``tune``) the way this process was run:
    ``unet-predict``, ``PYTHON scripts/predict.py`` where that script exists, else ``PYTHON -m
    unet_pl.cli.predict``; PYTHON is ``python`` where that is this interpreter, else this interpreter's
    path (``.venv/bin/python`` after ``make``, without the environment activated)."""
    program = _program()
    if program[0].startswith("unet-"):
        return f"unet-{tool}"
    beside = Path(program[-1]).parent / f"{tool}.py"  # scripts/predict.py next to scripts/train.py (no scripts/tune.py)
    if program[1:2] != ["-m"] and program[-1].endswith(".py") and beside.is_file():
        return shlex.join([_python(), str(beside)])
    return shlex.join([_python(), "-m", f"unet_pl.cli.{tool}"])


def _python() -> str:
    """How to call this interpreter: ``python`` where the shell finds this one by that name, else its path
    (relative to the working folder when inside it). Not resolved: a venv's python is a link to the system's."""
    exe = Path(sys.executable).absolute()
    found = shutil.which("python")
    if found and Path(found).absolute().parent == exe.parent:
        return "python"
    try:
        return str(exe.relative_to(Path.cwd().absolute()))
    except ValueError:
        return str(exe)


def _plain(value):
    """Tuples to lists, recursively, so yaml.safe_dump takes the hyperparameters."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def saved_epoch(path: Path) -> int | None:
    """The epoch a Lightning checkpoint was saved at (None: no such file, or none recorded)."""
    import torch

    if not path.is_file():
        return None
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True).get("epoch")
    except Exception:  # a damaged or foreign file: the metrics' own best stands
        return None
    return int(epoch) if isinstance(epoch, int) else None


def summarise(out: Path, args, trainer, checkpoint, interrupt, throughput, wall: float, pictures: list[Path]) -> str:
    """The lines printed at the end: best epoch, why it stopped, speed, where the files are."""
    from lightning.pytorch.callbacks import EarlyStopping

    from ..plots import best_epoch, read_epoch_metrics

    lines = []
    epochs = read_epoch_metrics(out)
    best = best_epoch(epochs)
    if interrupt.signal and best is not None:
        # stopped between an epoch's validation and its checkpoint: metrics.csv has a val/loss best.ckpt never got
        saved = saved_epoch(out / "best.ckpt")
        best = saved if saved in epochs else best
    if best is not None:
        m = epochs[best]
        lines.append(f"best epoch {best}: val/loss {m['val/loss']:.4f}, val/iou {m.get('val/iou', float('nan')):.4f}")
    early = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    if interrupt.signal:
        how = "mid-epoch state" if interrupt.saved_mid_epoch else "end of the last complete epoch"
        lines.append(f"interrupted by {interrupt.signal} in epoch {trainer.current_epoch}: last.ckpt holds the {how}; "
                     f"continue with: {shlex.join([*_program(), '--resume', 'last', '--out', str(out), *getattr(args, 'again', [])])}")
        from ..callbacks import TunePostprocessing

        if any(isinstance(c, TunePostprocessing) for c in trainer.callbacks):
            lines.append("best.ckpt keeps the default post-processing until the run ends (it is chosen on the "
                         f"validation images then); to choose it now: {sibling('tune')} --ckpt {shlex.quote(str(out / 'best.ckpt'))}")
    elif args.fast_dev_run:
        lines.append("fast dev run: one training and one validation batch; no checkpoints or logs written")
    elif early is not None and early.stopped_epoch > 0:
        lines.append(f"early stopping after epoch {early.stopped_epoch} ({args.patience} epochs without a lower val/loss)")
    else:
        lines.append(f"stopped after {trainer.current_epoch} epoch{'s' if trainer.current_epoch != 1 else ''} (--epochs {args.epochs}{', --max-time ' + args.max_time if args.max_time else ''})")
    where = f"{trainer.world_size} CPU process{'es' if trainer.world_size > 1 else ''}" if args.gpus == 0 else f"{trainer.world_size} GPU{'s' if trainer.world_size > 1 else ''}"
    lines.append(f"wall time {wall:.1f} s; training {throughput.images_per_second:.1f} images/s on {where}")
    from ..inference.settings import CUT_KEY

    tuned = next((c for c in trainer.callbacks if getattr(c, "chosen", None)), None)
    if tuned is not None:
        plain = ", ".join(f"{k} {v:g}" for k, v in tuned.chosen.items() if not isinstance(v, dict))
        cut = tuned.chosen.get(CUT_KEY)
        lines.append(f"post-processing chosen on the validation images (score {tuned.score:.3f}), saved in the checkpoints: "
                     + plain + ("; with --split-concave: " + ", ".join(f"{k} {v:g}" for k, v in cut.items()) if cut else ""))
    if args.fast_dev_run:
        return "\n".join(lines)  # nothing written, no run folder to name
    files = [p.name for p in (out / "best.ckpt", out / "last.ckpt", out / "hparams.yaml", out / "command.txt", *pictures) if p.exists()]
    logs = [d.name + "/" for d in (out / "logs", out / "tensorboard") if d.is_dir()]
    lines.append(f"run folder {out}: {' '.join(files + logs)}")
    if checkpoint.best_model_path:
        best = shlex.quote(str(out / "best.ckpt"))
        lines.append(f"predict: {sibling('predict')} --ckpt {best} --data-dir FOLDER --out-dir RESULTS")
        if getattr(args, "holdout", "none") != "none":  # the images it never trained on, and their score
            from ..data import SAMPLE_DIR

            data = shlex.quote(str(args.data_dir or SAMPLE_DIR))
            lines.append(f"its hold-out: {sibling('predict')} --ckpt {best} --data-dir {data} --holdout {args.holdout} "
                         f"--out-dir RESULTS, then {sibling('evaluate')} --pred RESULTS/submission.csv --truth {data} "
                         f"--ckpt {best}")
    return "\n".join(lines)


def draw(out: Path, datamodule, checkpoint, model, say) -> list[Path]:
    """curves.png and val_predictions.png (the kept model on validation images at their own size,
    as prediction sees them); a failure here must not hide a finished training."""
    from ..inference.checkpoint import load_model
    from ..plots import plot_curves, plot_val_predictions, predict_val_images, read_epoch_metrics

    pictures = []
    try:
        epochs = read_epoch_metrics(out)
        if epochs:
            pictures.append(plot_curves(epochs, out / "curves.png", title=out.name))
        best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else out / "best.ckpt"
        # the picture shows the model the run keeps, with the settings prediction will use
        net = load_model(best) if best.is_file() else model.unet.to("cpu").eval()
        settings = net.settings if best.is_file() else model.settings
        images, masks, probs, ids = predict_val_images(net, datamodule.validation_images(), settings=settings.decoded())
        if ids:
            pictures.append(plot_val_predictions(images, masks, probs, ids, out / "val_predictions.png", settings.threshold))
    except Exception as e:  # noqa: BLE001 -- report and go on: the checkpoints are what matter
        say(f"warning: could not draw the run's pictures: {type(e).__name__}: {e}")
    return pictures
