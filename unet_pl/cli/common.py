"""What every command line shares: one way to fail (one line on stderr, exit status 2) and a parser
that fails that way too."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Exit status for bad usage or bad input (as argparse's own).
EXIT_USAGE = 2
_prog = "unet_pl"


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, except where the default is None or False (a switch): there
    the flag is off unless given, or takes the checkpoint's value, which its help (or its group's) says in
    words; and except where the help already gives it ("(default ...")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        quiet = action.default is None or action.default is False or "(default" in (action.help or "")
        return action.help if quiet else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``argparse`` with our error shape: ``PROG: error: MESSAGE (see --help)``, no usage block."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        started_as = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
        if started_as.startswith("unet-"):  # a console script (unet-predict): errors and --help name it
            kwargs["prog"] = started_as
        super().__init__(*args, **kwargs)
        global _prog
        _prog = self.prog

    def error(self, message: str):
        extra = message.removeprefix("unrecognized arguments: ").split() if message.startswith("unrecognized") else []
        if extra and all(Path(a).exists() for a in extra):  # a shell wildcard: --data-dir cells/*.tif
            message += (" (files given where one is expected: a wildcard such as *.tif expands to every file; "
                        "--data-dir takes one image or the folder holding them)")
        fail(f"{message} (see --help)")


def holdout_arg(name: str) -> str:
    """argparse ``type`` of ``--holdout``: the name, or an error that says what is wrong with it (a
    grouped fold such as ``group:5/4`` is checked here; ``choices=HOLDOUTS`` alone only says "invalid")."""
    from ..data.holdout import check_holdout

    try:
        return check_holdout(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: The fields of the model, data module and settings whose messages start with their Python name.
FLAG_FIELDS = ("threshold", "seed_threshold", "min_size", "img_size", "tile", "scale", "min_relative_size",
               "min_probability", "channel", "crop_size", "val_split", "batch_size", "background")


def flag_names(message: str) -> str:
    """The Python API's messages name their fields (``img_size must be ...``); on the command line the
    user typed flags (``--img-size must be ...``)."""
    for name in FLAG_FIELDS:
        if message.startswith(f"{name} "):
            return f"--{name.replace('_', '-')}{message[len(name):]}"
    return message


def program_name() -> str:
    """The name errors start with: the script's (``predict.py``) or the console script's (``unet-predict``)."""
    return _prog


def fail(message: str):
    """Print ``PROG: error: MESSAGE`` on stderr and exit with status 2 (PROG: the last parser built)."""
    print(f"{_prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class _NoTips:
    """A logging filter that drops Lightning's "Tip: try installing ..." lines."""

    @staticmethod
    def filter(record) -> bool:
        return "Tip:" not in str(record.msg)[:8]


def quiet_lightning() -> None:
    """What Lightning prints that a user cannot act on: its advertising tips, the deprecation of its own
    use of torch's pytree API (torch 2.13), and the logging-interval note on small training sets."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips)  # where rank_zero_info logs
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
