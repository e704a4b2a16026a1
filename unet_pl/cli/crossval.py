"""``python scripts/crossval.py --data-dir stage1_train --out runs/cv [--folds 3] [--predict "FLAGS"] -- TRAIN FLAGS``

Grouped cross-validation of one recipe: for each fold k of K, train.py --holdout group:k/K
(whole acquisition groups that training never sees, unet_pl.data.groups) into OUT/fold_k,
then predict.py and evaluate.py on exactly those images; then the DSB score per fold and
pooled (every image is held out once), per modality, in OUT/crossval.csv and a markdown table.
A rerun reuses the folds already trained (an interrupted fold resumes from its last.ckpt) and
their scores; other --predict flags predict and score again, without retraining.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from ..data.groups import DEFAULT_FOLDS, folder_groups, group_holdout, group_modality
from ..data.holdout import MODALITIES
from .common import Parser, fail

#: Written into a fold's folder when its train.py exited 0 (best.ckpt alone exists from the first epoch on).
TRAINED = "crossval_trained.txt"
#: Written into a fold's folder with the predict and evaluate commands that made its scores.csv.
SCORED = "crossval_scored.txt"
#: Flags crossval.py sets itself for each fold.
OWN_TRAIN_FLAGS = ("--data-dir", "--holdout", "--out", "--resume", "--fast-dev-run")
OWN_PREDICT_FLAGS = ("--data-dir", "--holdout", "--ckpt", "--keras-h5", "--out", "--out-dir")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="crossval.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--data-dir", default=None, help="stage1_train-style folder. Default: the bundled sample")
    p.add_argument("--out", required=True, help="folder for fold_1 ... fold_K, crossval.csv and commands.txt")
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                   help="K: histology has three stain groups, so with 3 every fold holds some out (unet_pl.data.groups)")
    p.add_argument("--predict", default="", metavar="FLAGS",
                   help='predict.py flags for every fold, one string: '
                        '--predict "--tta d4 --min-size 20 --fill-holes --scale auto --split-concave" '
                        '(a single flag: --predict=--fill-holes)')
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(crossval flags, train.py flags)``: the training flags follow ``--``."""
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], argv[k + 1:]
    return argv, []


def _refuse(flags: list[str], own: tuple[str, ...], where: str) -> None:
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in own:
            fail(f"{name} in the {where} flags: crossval.py sets {', '.join(own)} itself for each fold; remove it")


def run(cmd: list[str], log: list[str]) -> None:
    """Run ``cmd`` (its output goes to ours), noting it in ``log``; a failure ends crossval.py in one line."""
    line = shlex.join(cmd)
    print(f"\n$ {line}", flush=True)
    log.append(line)
    code = subprocess.run(cmd).returncode
    if code:
        fail(f"exit status {code} from: {line} (its messages are above; run crossval.py again to continue)")


def train_fold(fold_dir: Path, cmd: list[str], log: list[str]) -> None:
    """Train one fold unless it has been (resume an interrupted one from its last.ckpt)."""
    if (fold_dir / TRAINED).is_file():
        if not (fold_dir / "best.ckpt").is_file():
            fail(f"{fold_dir} says it was trained but has no best.ckpt; remove {fold_dir / TRAINED} to train it again")
        print(f"\n{fold_dir}: trained before ({fold_dir / 'best.ckpt'}), not retrained", flush=True)
        log.append(f"# not rerun, trained before: {shlex.join(cmd)}")
        return
    if (fold_dir / "last.ckpt").is_file():
        cmd = [*cmd, "--resume", "last"]
    run(cmd, log)
    (fold_dir / TRAINED).write_text(shlex.join(cmd) + "\n")


def score_fold(fold_dir: Path, cmds: list[list[str]], log: list[str]) -> None:
    """Predict and score one fold, unless its scores.csv came from these very commands after its best.ckpt."""
    done, scores = fold_dir / SCORED, fold_dir / "scores.csv"
    lines = "".join(shlex.join(c) + "\n" for c in cmds)
    if done.is_file() and done.read_text() == lines and scores.is_file() and \
            scores.stat().st_mtime_ns >= (fold_dir / "best.ckpt").stat().st_mtime_ns:
        print(f"\n{fold_dir}: scored before with the same commands ({scores}), not predicted again", flush=True)
        log.extend(f"# not rerun, scored before: {shlex.join(c)}" for c in cmds)
        return
    done.unlink(missing_ok=True)
    for c in cmds:
        run(c, log)
    done.write_text(lines)


def read_scores(path: Path) -> dict[str, float]:
    """``{image id: DSB score}`` from evaluate.py's per-image CSV."""
    with open(path, newline="") as f:
        return {row["ImageId"]: float(row["score"]) for row in csv.DictReader(f)}


def summary_row(fold: str, scores: dict[str, float], groups: dict[str, str]) -> dict[str, object]:
    """One row of crossval.csv: the mean score of ``scores`` overall and per modality (with counts)."""
    row: dict[str, object] = {"fold": fold, "images": len(scores), "score": _mean(scores.values())}
    for m in MODALITIES:
        values = [s for i, s in scores.items() if group_modality(groups[i]) == m]
        row[m], row[f"{m}_images"] = _mean(values), len(values)
    row["groups"] = "; ".join(sorted({groups[i] for i in scores}))
    return row


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _cell(score: float | None, n: int | None = None) -> str:
    if score is None:
        return "-"
    return f"{score:.3f}" + (f" ({n})" if n is not None else "")


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| fold | images | score | " + " | ".join(MODALITIES) + " |", "|---|---|---|" + "---|" * len(MODALITIES)]
    for r in rows:
        cells = [str(r["fold"]), str(r["images"]), _cell(r["score"])]
        cells += [_cell(r[m], r[f"{m}_images"]) for m in MODALITIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: "" if v is None else f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)


def main(argv: list[str] | None = None) -> None:
    own, train_flags = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    predict_flags = shlex.split(args.predict)
    _refuse(train_flags, OWN_TRAIN_FLAGS, "training (after --)")
    _refuse(predict_flags, OWN_PREDICT_FLAGS, "--predict")
    if args.folds < 2:
        fail(f"--folds must be at least 2, got {args.folds}")
    from ..data import SAMPLE_DIR
    from ..inference.checkpoint import read_checkpoint

    data_dir = str(args.data_dir or SAMPLE_DIR)
    out, k_total = Path(args.out), args.folds
    try:
        groups = folder_groups(data_dir)
        folds = {k: group_holdout(list(groups), list(groups.values()), f"group:{k}/{k_total}") for k in range(1, k_total + 1)}
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    python, log = sys.executable, []
    rows, pooled = [], {}
    for k, expected in folds.items():
        holdout, fold_dir = f"group:{k}/{k_total}", out / f"fold_{k}"
        train_fold(fold_dir, [python, "-m", "unet_pl.cli.train", "--data-dir", data_dir, "--holdout", holdout,
                              "--out", str(fold_dir), *train_flags], log)
        ckpt = fold_dir / "best.ckpt"
        try:
            saved = (read_checkpoint(ckpt).get("NucleiDataModule") or {}).get("holdout_ids")
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        if saved is not None and sorted(saved) != expected:
            fail(f"{ckpt} held out {len(saved)} images, but fold {holdout} of {data_dir} is {len(expected)} images now: "
                 f"the folder changed since; train into a new --out")
        submission, scores_csv = fold_dir / "submission.csv", fold_dir / "scores.csv"
        score_fold(fold_dir, [
            [python, "-m", "unet_pl.cli.predict", "--ckpt", str(ckpt), "--data-dir", data_dir, "--holdout", holdout,
             "--out", str(submission), "--no-progress", *predict_flags],
            [python, "-m", "unet_pl.cli.evaluate", "--pred", str(submission), "--truth", data_dir, "--holdout", holdout,
             "--out", str(scores_csv)]], log)
        scores = read_scores(scores_csv)
        if sorted(scores) != expected:
            fail(f"{scores_csv} scores {len(scores)} images, but fold {holdout} holds out {len(expected)}")
        rows.append(summary_row(f"{k}/{k_total}", scores, groups))
        pooled.update(scores)
    rows.append(summary_row("pooled", pooled, groups))
    write_csv(out / "crossval.csv", rows)
    by_group = defaultdict(dict)
    for i, s in pooled.items():
        by_group[groups[i]][i] = s
    group_rows = [{"group": g, "fold": next(k for k, ids in folds.items() if i in ids), "images": len(v),
                   "score": _mean(v.values())} for g, v in sorted(by_group.items()) for i in [next(iter(v))]]
    write_csv(out / "crossval_groups.csv", group_rows)
    (out / "commands.txt").write_text("\n".join(log) + "\n")
    print(f"\ngrouped cross-validation, {k_total} folds of {data_dir} (DSB score; images in brackets):\n")
    print(markdown(rows))
    print("\n| group | fold | images | score |\n|---|---|---|---|")
    for r in group_rows:
        print(f"| {r['group']} | {r['fold']} | {r['images']} | {_cell(r['score'])} |")
    print("\ncommands:\n" + "\n".join(log))
    print(f"\nresults: {out / 'crossval.csv'}, {out / 'crossval_groups.csv'}, {out / 'commands.txt'}, {out}/fold_*/scores.csv")


if __name__ == "__main__":
    main()
