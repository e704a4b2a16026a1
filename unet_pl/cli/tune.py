"""``python -m unet_pl.cli.tune --ckpt RUN/best.ckpt [--data-dir FOLDER] [--out FILE]``

Chooses a trained run's post-processing again on its validation images, as train.py does at the
end of training: the threshold, watershed seed threshold and minimum nucleus size, and the same
three for --split-concave. For checkpoints trained before the tuner chose values for the cut
(before 2026-12-02), which otherwise predict with --split-concave at the values chosen without it.
Only the checkpoint's post-processing changes (the file replaced whole); the weights stay.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import Parser, fail


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tune.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True, help="a run's checkpoint (RUN/best.ckpt): it records the run's data and so "
                                                 "its validation images")
    p.add_argument("--data-dir", default=None, help="the run's training folder, where it is now (default: where it "
                                                    "was when the run trained)")
    p.add_argument("--out", default=None, help="write the re-tuned checkpoint here (default: replace --ckpt)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from ..data.module import NucleiDataModule
    from ..inference.checkpoint import load_model, read_checkpoint, save_atomically
    from ..inference.settings import CUT_KEY, UNTRAINED_SCORE, Settings, untrained_warning
    from ..inference.tune import tune_postprocessing

    path = Path(args.ckpt)
    try:
        ckpt = read_checkpoint(path)
        net = load_model(ckpt, name=str(path))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not data:
        fail(f"{path} holds no record of its run's data (an exported or bundled model): give the run's best.ckpt")
    data_dir = args.data_dir or data.get("data_dir")  # None: the bundled sample, as in training
    if data_dir is not None and not Path(data_dir).is_dir():
        fail(f"{path} trained on {data_dir}, which is not a folder here: give --data-dir (the same images)")
    hp = ckpt.get("hyper_parameters") or {}
    old = hp.get("postprocess")
    try:
        dm = NucleiDataModule(**{**data, "data_dir": data_dir})
        dm.prepare_data()
        dm.setup("fit")
        if dm.val_set is None or not len(dm.val_set):
            fail(f"{path}'s run has no validation images to choose on (it trained with val_split 0)")
        # the tuner starts where training's did: the model without a chosen post-processing
        start = Settings.from_hparams({**hp, "postprocess": None})
        chosen, score = tune_postprocessing(net.eval(), ((im, lab) for _, im, lab in dm.validation_images()), start)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{path}: {e}")
    hp["postprocess"], hp["tune_score"] = chosen, round(float(score), 4)
    out = save_atomically(ckpt, Path(args.out) if args.out else path)

    def said(values: dict | None) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in values.items() if k != CUT_KEY) if values else "none"

    print(f"chosen on {len(dm.val_set)} validation images (score {score:.3f}): {said(chosen)}; "
          f"with --split-concave: {said(chosen.get(CUT_KEY))}")
    print(f"before: {said(old)}; with --split-concave: {said((old or {}).get(CUT_KEY)) if old and CUT_KEY in old else 'as without'}")
    print(f"wrote {out}")
    if score < UNTRAINED_SCORE:
        print(f"warning: {untrained_warning(score)}")


if __name__ == "__main__":
    main()
