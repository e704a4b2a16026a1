"""``python -m unet_pl.cli.lightning fit --config config.yaml`` (or ``unet-fit``): Lightning's own CLI.

For Lightning users who keep runs in config files: ``fit``, ``validate``, ``test`` and ``predict``
with ``--config``, ``--print_config``, every ``LitUNet`` (``--model.*``), ``NucleiDataModule``
(``--data.*``) and ``Trainer`` (``--trainer.*``) argument. The geometry is given once, on the
data module: ``--data.resolution``, ``--data.img_size`` and ``--data.head`` are linked into the
model, so the two cannot disagree. ``scripts/train.py`` stays the main entry (run folder,
resume, summary); this one is Lightning's (the model adds its callbacks: the post-processing
tuning with ``--model.tune``, on for the boundary heads by default, and the CPU settings).

    python -m unet_pl.cli.lightning fit --data.data_dir path/to/stage1_train --data.resolution native \\
        --data.head mask+boundary --trainer.max_epochs 100 --print_config > config.yaml
    python -m unet_pl.cli.lightning fit --config config.yaml
"""
from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from ..data.module import NucleiDataModule
from ..geometry import SHARED_KEYS
from ..lit import LitUNet


class UNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for key in SHARED_KEYS:
            parser.link_arguments(f"data.{key}", f"model.{key}")


def main(args: list[str] | None = None) -> None:
    """``unet-fit`` / ``python -m unet_pl.cli.lightning``: returns nothing, so the console script exits 0
    after a good run (a returned object would be printed and read as a failure)."""
    from .common import quiet_lightning

    quiet_lightning()
    UNetCLI(LitUNet, NucleiDataModule, args=args, save_config_kwargs={"overwrite": False})


if __name__ == "__main__":
    main()
