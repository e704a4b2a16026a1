"""``python -m unet_pl.cli.export --ckpt RUN/best.ckpt --out model.ckpt``

Writes a checkpoint for sharing: the weights and the settings prediction uses (reading,
geometry, tuned post-processing) and the ids the run held out; no optimizer or loop state.
``make pretrained`` uses it to refresh the bundled model (docs/model-card.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import Parser, fail


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="export.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--ckpt", required=True, help="a training checkpoint (RUN/best.ckpt)")
    p.add_argument("--out", default=None, help="the small checkpoint to write")
    p.add_argument("--bioimageio", default=None, metavar="DIR",
                   help="also (or only) write a BioImage Model Zoo package (rdf.yaml, weights, test tensors) into DIR")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from ..inference.checkpoint import export_model, load_model

    if args.out is None and args.bioimageio is None:
        fail("say what to write: --out FILE (a small checkpoint) and/or --bioimageio DIR")
    if args.out is not None and Path(args.out).resolve() == Path(args.ckpt).resolve():
        fail(f"--out {args.out} is the checkpoint being exported: it would lose its training state; write elsewhere")
    try:
        if args.out is not None:
            out = export_model(args.ckpt, args.out)
            print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB): {load_model(out).settings.describe()}")
        if args.bioimageio is not None:
            from ..inference.bioimageio import export_bioimageio

            rdf = export_bioimageio(load_model(args.ckpt), args.bioimageio)
            print(f"wrote {rdf} (validate: python -c \"import bioimageio.spec as s; print(s.load_description('{rdf}'))\")")
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
