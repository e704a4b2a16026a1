"""``python -m unet_pl.cli.export --ckpt RUN/best.ckpt --out model.ckpt``

Writes a checkpoint for sharing: the weights and the settings prediction uses (reading,
geometry, tuned post-processing) and the ids the run held out; no optimizer or loop state.
``make pretrained`` uses it to refresh the bundled model (docs/model-card.md).
"""
from __future__ import annotations

import argparse

from .common import Parser, fail


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="export.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True, help="a training checkpoint (RUN/best.ckpt)")
    p.add_argument("--out", required=True, help="the file to write")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from ..inference.checkpoint import export_model, load_model

    try:
        out = export_model(args.ckpt, args.out)
        settings = load_model(out).settings
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB): {settings.describe()}")


if __name__ == "__main__":
    main()
