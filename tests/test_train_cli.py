"""scripts/train.py: the run folder, bad flags, interrupt and resume, GPU runs (skipped without CUDA).

Runs train on the bundled sample (30 real images) at 32 px in subprocesses, the way users run it.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unet_pl import LitUNet
from unet_pl.cli.train import build_parser, parse_args
from unet_pl.plots import read_epoch_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "32", "--batch-size", "4", "--num-workers", "0"]
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One decoded cache of the sample for every run of this module."""
    return tmp_path_factory.mktemp("cache")


def train_cmd(*args: str, cache: Path) -> list[str]:
    return [sys.executable, "-m", "unet_pl.cli.train", *args, "--cache-dir", str(cache)]


def runs_this_python(word: str, cwd: Path) -> bool:
    """Whether a shell in ``cwd`` with this PATH runs this interpreter for the command word ``word``."""
    found = shutil.which(word) if os.sep not in word else str(cwd / word)
    return found is not None and Path(found).absolute().parent == Path(sys.executable).absolute().parent


def run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


# ---------------------------------------------------------------- end to end on the CPU


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "run"
    proc = run(train_cmd("--gpus", "0", "--epochs", "3", "--patience", "0", *TINY, "--out", str(out), cache=cache_dir), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_run_folder_holds_every_file(cpu_run):
    out, proc = cpu_run
    said = proc.stdout + proc.stderr
    assert "Tip:" not in said and "LeafSpec" not in said and "smaller than the logging interval" not in said  # Lightning's noise
    for name in ("best.ckpt", "last.ckpt", "hparams.yaml", "command.txt", "curves.png", "val_predictions.png"):
        assert (out / name).is_file(), name
    assert list(out.glob("logs/version_0/metrics.csv"))
    assert list(out.glob("tensorboard/version_0/events.out.tfevents.*"))
    assert "--epochs 3" in (out / "command.txt").read_text()
    assert "img_size: 32" in (out / "hparams.yaml").read_text()


def test_best_checkpoint_loads_without_arguments(cpu_run):
    model = LitUNet.load_from_checkpoint(cpu_run[0] / "best.ckpt", map_location="cpu")
    assert model.hparams.img_size == 32
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_val_loss_falls(cpu_run):
    epochs = read_epoch_metrics(cpu_run[0])
    assert sorted(epochs) == [0, 1, 2]
    assert epochs[2]["val/loss"] < epochs[0]["val/loss"]


def test_summary_says_what_happened(cpu_run):
    out, proc = cpu_run
    assert "best epoch" in proc.stdout and "images/s" in proc.stdout and str(out) in proc.stdout
    assert "no CUDA" not in proc.stdout  # --gpus 0 was explicit: nothing to explain


# ---------------------------------------------------------------- flags


def test_help_documents_every_flag():
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in flags} >= {
        "--gpus", "--num-nodes", "--data-dir", "--epochs", "--batch-size", "--lr", "--l2", "--optimizer", "--img-size",
        "--val-split", "--augment", "--seed", "--patience", "--precision", "--num-workers", "--out", "--resume",
        "--max-time", "--fast-dev-run", "--deterministic", "--cache-dir", "--compile"}
    assert all(a.help for a in flags)


@pytest.mark.skipif(CUDA, reason="checks the message a machine without CUDA gives")
def test_gpus_1_without_cuda_exits_2_with_one_line(tmp_path):
    proc = run([sys.executable, str(ROOT / "scripts" / "train.py"), "--gpus", "1", "--out", str(tmp_path / "x")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--gpus 1" in lines[0] and "no CUDA device is visible" in lines[0] and "--gpus 0" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, words", [
    (["--gpus", "0", "--precision", "16-mixed"], "16-mixed needs a CUDA GPU"),
    (["--gpus", "0", "--max-time", "2h"], "DD:HH:MM:SS"),
    (["--gpus", "0", "--val-split", "0"], "--val-split"),
    (["--gpus", "0", "--resume", "nowhere.ckpt"], "no checkpoint at nowhere.ckpt"),
    (["--gpus", "0", "--data-dir", "/does/not/exist"], "does not exist; pass the competition's stage1_train"),
    (["--gpus", "0", "--data-dir", str(Path(__file__))], "is a file; train.py takes a folder: the competition's"),
    (["--gpus", "0", "--optimizer", "rmsprop"], "invalid choice"),
    (["--gpus", "-1"], "--gpus must be >= 0"),
    (["--gpus", "0", "--compile", "default", "--mode", "instance"], "--compile needs fixed image sizes"),
    (["--gpus", "0", "--augment", "colour+scale"], "needs --resolution native"),
    (["--gpus", "0", "--contact-weight", "2"], "--contact-weight 2.0 needs the boundary head"),
    (["--gpus", "0", "--boundary-target", "ring+contact"], "--boundary-target ring+contact needs the boundary head"),
    (["--gpus", "0", "--ema", "1"], "--ema must be a decay in [0, 1) such as 0.995"),
    (["--gpus", "0", "--lovasz-weight", "-1"], "--lovasz-weight must be a number >= 0, got -1.0"),
    (["--gpus", "0", "--lr", "-1"], "--lr must be > 0, e.g. 1e-3, got -1.0"),
    (["--gpus", "0", "--patience", "-2"], "--patience must be >= 0 (0: no early stopping), got -2"),
    (["--gpus", "0", "--init", "pretrained", "--resume", "last"], "--init starts a new run from a checkpoint's weights"),
])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys, tmp_path, monkeypatch):
    from unet_pl.cli.train import resolve_run_dir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        resolve_run_dir(parse_args(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_loss_flags_reach_the_model():
    from unet_pl.cli.train import make_model

    hp = make_model(parse_args(["--gpus", "0", "--mode", "instance", "--lovasz-weight", "0.5", "--dice-weight", "2"])).hparams
    assert (hp.lovasz_weight, hp.dice_weight) == (0.5, 2.0)


def test_img_size_not_multiple_of_16_is_a_usage_error(tmp_path, cache_dir):
    proc = run(train_cmd("--gpus", "0", "--img-size", "40", "--out", str(tmp_path / "r"), cache=cache_dir), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "multiple of 16" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- interrupt and resume


def signal_once_checkpointed(cmd: list[str], out: Path, sig: int, cwd: Path) -> tuple[int, str]:
    """Start a training run, send ``sig`` once its first ``last.ckpt`` exists; its exit status and output.
    The run gets Ctrl-C's default action whatever this process inherited: a test suite started as a
    background job of a script ignores SIGINT, and so would every program it starts."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while not (out / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=120)
    return proc.returncode, stdout


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, cache_dir, extra):
    """Cut by SIGTERM after the first epoch, resumed with --resume last: same epochs, same weights
    (with --ema: the average and the current weights)."""
    det = ["--gpus", "0", "--epochs", "4", "--deterministic", *TINY[:-1], "1", *extra]  # one loader worker: seeds travel with the indices
    ref = run(train_cmd(*det, "--out", str(tmp_path / "ref"), cache=cache_dir), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]

    cut = tmp_path / "cut"
    returncode, stdout = signal_once_checkpointed(train_cmd(*det, "--out", str(cut), cache=cache_dir), cut, signal.SIGTERM, tmp_path)
    assert returncode == 143, stdout[-3000:]
    assert "interrupted by SIGTERM" in stdout and "--resume last" in stdout
    cut_epoch = torch.load(cut / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    assert cut_epoch < 3  # stopped part way

    resumed = run(train_cmd(*det, "--out", str(cut), "--resume", "last", cache=cache_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "ref" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(cut / "last.ckpt", map_location="cpu", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (3, a["global_step"])
    stop_a = {k: v for k, v in a["callbacks"].items() if k.startswith("EarlyStopping")}
    stop_b = {k: v for k, v in b["callbacks"].items() if k.startswith("EarlyStopping")}
    assert stop_a.keys() == stop_b.keys() and stop_a  # early stopping state went through the resume
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert ("current_model_state" in a) == ("current_model_state" in b) == bool(extra)
    for k, v in a.get("current_model_state", {}).items():
        assert torch.equal(v, b["current_model_state"][k]), k
    assert len((cut / "command.txt").read_text().splitlines()) == 2  # the cut run and the resume
    assert sorted(read_epoch_metrics(cut)) == [0, 1, 2, 3]


def test_ctrl_c_keeps_last_ckpt_and_exits_130(tmp_path, cache_dir):
    out = tmp_path / "my run's cc"  # the printed command quotes it
    cmd = train_cmd("--gpus", "0", "--epochs", "1000", "--patience", "0", *TINY, "--out", str(out), cache=cache_dir)
    returncode, stdout = signal_once_checkpointed(cmd, out, signal.SIGINT, tmp_path)
    assert returncode == 130, stdout[-3000:]
    assert "interrupted by SIGINT" in stdout
    line = next(x for x in stdout.splitlines() if "continue with: " in x).split("continue with: ", 1)[1]
    python, *rest = shlex.split(line)
    # with the machine flags given (a resume takes those from its own command line, not from the run)
    assert rest == ["-m", "unet_pl.cli.train", "--resume", "last", "--out", str(out),
                    "--gpus", "0", "--num-workers", "0", "--cache-dir", str(cache_dir)]
    assert runs_this_python(python, tmp_path)  # as printed, in the shell it was run from: not a bare python of another
    assert LitUNet.load_from_checkpoint(out / "last.ckpt", map_location="cpu") is not None


def test_resume_from_a_checkpoint_path_continues_in_its_folder(tmp_path, cache_dir):
    """--resume PATH (not 'last'): the run folder defaults to the checkpoint's, epochs carry on."""
    out = tmp_path / "first"
    short = ["--gpus", "0", "--patience", "0", *TINY]
    first = run(train_cmd(*short, "--epochs", "2", "--out", str(out), cache=cache_dir), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "elsewhere.ckpt"
    saved.write_bytes((out / "last.ckpt").read_bytes())
    more = run(train_cmd(*short, "--epochs", "3", "--resume", str(out / "last.ckpt"), cache=cache_dir), cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"resuming from {out / 'last.ckpt'}" in more.stdout
    assert sorted(read_epoch_metrics(out)) == [0, 1, 2]  # epoch 2 added to the same folder
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2
    assert len((out / "command.txt").read_text().splitlines()) == 2
    # a checkpoint outside any run folder: its folder becomes the run folder
    again = run(train_cmd(*short, "--epochs", "3", "--resume", str(saved), cache=cache_dir), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "last.ckpt").is_file() and (tmp_path / "command.txt").is_file()


def test_a_cosine_run_resumes_only_with_its_own_schedule_and_epochs(tmp_path, cache_dir):
    """The decay spans the run's --epochs: resuming with other epochs or another schedule would jump the
    learning rate, so it is one line naming the run's flags, exit 2, before any training."""
    out = tmp_path / "cos"
    short = ["--gpus", "0", "--patience", "0", *TINY]
    first = run(train_cmd(*short, "--epochs", "2", "--lr-schedule", "cosine", "--out", str(out), cache=cache_dir), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]["schedule_epochs"] == 2
    for flags in (["--epochs", "4", "--lr-schedule", "cosine"], ["--epochs", "4", "--lr-schedule", "constant"]):
        bad = run(train_cmd(*short, *flags, "--resume", str(out / "last.ckpt"), cache=cache_dir), cwd=tmp_path)
        assert bad.returncode == 2, bad.stderr[-2000:]
        line = bad.stderr.strip().splitlines()[-1]
        assert "its run trained with --lr-schedule cosine --epochs 2" in line and "same --lr-schedule and --epochs" in line, line
    # its own --epochs 2 (taken from the run) are all trained: nothing to resume
    done = run(train_cmd(*short, "--resume", str(out / "last.ckpt"), cache=cache_dir), cwd=tmp_path)
    assert done.returncode == 2 and "nothing is left to train" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert sorted(read_epoch_metrics(out)) == [0, 1]  # nothing trained by the refused resumes


def test_resume_last_alone_carries_on_with_the_runs_own_flags(tmp_path, cache_dir):
    """``--resume last --out RUN`` with no other flag: the run's data folder, mode and flags come back
    from its hparams.yaml (an instance run on 8 images of the sample, not the whole bundled sample in
    notebook mode); a flag given now wins and is named; too few --epochs is one line that changes
    nothing in the folder."""
    import shutil

    import yaml

    sample = ROOT / "unet_pl" / "sample" / "stage1_train"
    data = tmp_path / "eight" / "stage1_train"
    data.mkdir(parents=True)
    for d in sorted(sample.iterdir())[:8]:
        shutil.copytree(d, data / d.name)
    out = tmp_path / "inst"
    first = run(train_cmd("--gpus", "0", "--mode", "instance", "--ema", "0.9", "--tune", "off", "--crop-size", "32", "--batch-size", "4",
                          "--num-workers", "0", "--val-split", "0.25", "--epochs", "2", "--patience", "0",
                          "--data-dir", str(data.parent), "--out", str(out), cache=cache_dir), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = yaml.safe_load((out / "hparams.yaml").read_text())
    logs = sorted(p.name for p in (out / "logs").iterdir())

    few = run([sys.executable, "-m", "unet_pl.cli.train", "--gpus", "0", "--resume", "last", "--out", str(out), "--epochs", "1",
               "--cache-dir", str(cache_dir)], cwd=tmp_path)
    assert few.returncode == 2 and "--epochs above 2" in few.stderr.strip().splitlines()[-1], few.stderr[-2000:]
    assert yaml.safe_load((out / "hparams.yaml").read_text()) == saved
    assert sorted(p.name for p in (out / "logs").iterdir()) == logs

    # the run's own --mode given again keeps its explicit --ema 0.9 (not the preset's 0.995)
    more = run([sys.executable, "-m", "unet_pl.cli.train", "--gpus", "0", "--resume", "last", "--out", str(out), "--epochs", "3",
                "--mode", "instance", "--cache-dir", str(cache_dir)], cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"resuming with the flags of the run in {out / 'hparams.yaml'}; given now instead: --epochs 3 (the run: 2)\n" in more.stdout
    last = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["datamodule_hyper_parameters"]["data_dir"] == str(data.parent)
    assert last["hyper_parameters"]["head"] == "mask+boundary" and last["hyper_parameters"]["ema"] == 0.9
    now = yaml.safe_load((out / "hparams.yaml").read_text())["cli"]
    assert {k: now[k] for k in ("mode", "data_dir", "crop_size", "val_split", "patience")} == {
        k: saved["cli"][k] for k in ("mode", "data_dir", "crop_size", "val_split", "patience")}
    assert sorted(read_epoch_metrics(out)) == [0, 1, 2]
    # a hand-edited hparams.yaml with a value train.py does not take: one line naming the file
    edited = yaml.safe_load((out / "hparams.yaml").read_text())
    edited["cli"]["lr"] = "fast"
    (out / "hparams.yaml").write_text(yaml.safe_dump(edited))
    bad = run([sys.executable, "-m", "unet_pl.cli.train", "--gpus", "0", "--resume", "last", "--out", str(out), "--epochs", "4",
               "--cache-dir", str(cache_dir)], cwd=tmp_path)
    line = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "hparams.yaml" in line and "--lr" in line and "'fast'" in line, bad.stderr[-2000:]


def test_an_early_stopped_run_resumes_only_with_more_patience_and_then_uses_it(tmp_path, cache_dir):
    """A run early stopping ended (--patience 1 at a learning rate that never lowers val/loss): resumed
    with its own patience it would stop at once, so it is one line; with --patience 3 it trains on and
    keeps 3, not the checkpoint's 1 (Lightning's EarlyStopping restores the saved patience)."""
    out = tmp_path / "es"
    short = ["--gpus", "0", *TINY]
    first = run(train_cmd(*short, "--epochs", "30", "--patience", "1", "--lr", "0.5", "--out", str(out), cache=cache_dir),
                cwd=tmp_path)
    assert first.returncode == 0 and "early stopping after epoch" in first.stdout, first.stdout[-2000:] + first.stderr[-2000:]
    stopped = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    again = run(train_cmd("--gpus", "0", "--resume", "last", "--out", str(out), cache=cache_dir), cwd=tmp_path)
    line = again.stderr.strip().splitlines()[-1]
    assert again.returncode == 2 and "stopped early" in line and "larger --patience" in line, again.stderr[-2000:]
    more = run(train_cmd("--gpus", "0", "--resume", "last", "--out", str(out), "--patience", "3", cache=cache_dir), cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    last = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("EarlyStopping"))
    assert last["epoch"] >= stopped + 3 and state["patience"] == 3, (stopped, last["epoch"], state)


def test_max_time_stops_a_long_run_and_says_so(tmp_path, cache_dir):
    out = tmp_path / "timed"
    start = time.monotonic()
    proc = run(train_cmd("--gpus", "0", "--epochs", "100000", "--patience", "0", "--max-time", "00:00:00:04", *TINY,
                         "--out", str(out), cache=cache_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 90
    assert "--max-time 00:00:00:04" in proc.stdout and (out / "last.ckpt").is_file()
    last_epoch = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    assert 0 <= last_epoch < 100000


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@gpu
@needs_cuda
def test_gpus_1_trains_on_the_gpu(tmp_path, cache_dir):
    out = tmp_path / "gpu"
    proc = run([sys.executable, str(ROOT / "scripts" / "train.py"), "--gpus", "1", "--epochs", "2", *TINY, "--out", str(out),
                "--cache-dir", str(cache_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 GPU" in proc.stdout
    model = LitUNet.load_from_checkpoint(out / "best.ckpt", map_location="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@gpu
@needs_cuda
def test_bf16_mixed_on_cuda(tmp_path, cache_dir):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    out = tmp_path / "bf16"
    proc = run(train_cmd("--gpus", "1", "--precision", "bf16-mixed", "--epochs", "2", *TINY, "--out", str(out), cache=cache_dir),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = read_epoch_metrics(out)
    assert sorted(epochs) == [0, 1] and all(torch.isfinite(torch.tensor(m["val/loss"])) for m in epochs.values())
    # weights stay float32 under autocast; the checkpoint loads on a CPU
    model = LitUNet.load_from_checkpoint(out / "best.ckpt", map_location="cpu")
    assert next(model.parameters()).dtype == torch.float32


@gpu
@needs_cuda
def test_compile_reduce_overhead_trains_and_saves_plain_checkpoints(tmp_path, cache_dir):
    """--compile reduce-overhead (CUDA graphs) through training and validation; the checkpoint keeps
    the parameter names, so it loads into an uncompiled LitUNet and predicts the same."""
    out = tmp_path / "compiled"
    proc = run(train_cmd("--gpus", "1", "--compile", "reduce-overhead", "--epochs", "3", "--patience", "0", *TINY,
                         "--out", str(out), cache=cache_dir), cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = read_epoch_metrics(out)
    assert sorted(epochs) == [0, 1, 2]
    assert epochs[2]["val/loss"] < epochs[0]["val/loss"]
    state = weights(out / "best.ckpt")
    assert not any("_orig_mod" in k for k in state)
    model = LitUNet.load_from_checkpoint(out / "best.ckpt", map_location="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fast_dev_run_trains_one_batch_and_writes_nothing(tmp_path, cache_dir):
    out = tmp_path / "smoke"
    proc = run(train_cmd("--gpus", "0", "--fast-dev-run", *TINY, "--out", str(out), cache=cache_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fast dev run" in proc.stdout and "run folder" not in proc.stdout  # it makes none: names none
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_precision_auto_picks_bf16_only_with_native_support(monkeypatch):
    from unet_pl.cli import train as cli

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cli.native_bf16(gpu=False) is False  # AVX512 without BF16: emulated bf16 is slower than float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cli.native_bf16(gpu=False) is True
    args = cli.parse_args(["--gpus", "0"])
    assert args.precision == "bf16-mixed"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert cli.parse_args(["--gpus", "0"]).precision == "32"


def test_cpu_training_loads_in_process_by_default(monkeypatch):
    """On the CPU the step uses every core: loader workers would only compete with it (README)."""
    from unet_pl.data import module as data

    assert parse_args(["--gpus", "0"]).num_workers == 0
    assert parse_args(["--gpus", "0", "--num-workers", "3"]).num_workers == 3
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(data.os, "cpu_count", lambda: 16)
    assert data.default_workers(1) == 8 and data.default_workers(2) == 7 and data.default_workers(16) == 1


def test_every_flag_of_train_and_predict_is_in_the_readme():
    from unet_pl.cli.predict import build_parser as predict_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for parser in (build_parser(), predict_parser()):
        missing = [a.option_strings[0] for a in parser._actions
                   if a.option_strings and a.dest != "help" and a.option_strings[0] not in readme]
        assert not missing, f"{parser.prog}: {missing} not in the README"


def test_mode_presets_fill_what_was_not_given(tmp_path):
    args = parse_args(["--gpus", "0", "--mode", "instance"])
    assert (args.resolution, args.head, args.tune, args.intensity, args.ema, args.augment) == (
        "native", "mask+boundary", "on", "grey", 0.995, "texture")
    args = parse_args(["--gpus", "0", "--mode", "instance", "--intensity", "fixed", "--tune", "off", "--ema", "0", "--augment", "default"])
    assert (args.tune, args.intensity, args.ema, args.augment) == ("off", "fixed", 0.0, "default")
    args = parse_args(["--gpus", "0"])
    assert (args.resolution, args.head, args.tune, args.intensity, args.ema, args.augment) == ("resize", "mask", "off", "fixed", 0.0, "default")


def test_the_commands_train_py_suggests_exist(monkeypatch):
    """The predict and tune commands in train.py's closing lines, for each way it is started."""
    from unet_pl.cli.run_folder import sibling

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None, raising=False)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / "train.py")])
    python, script = shlex.split(sibling("predict"))
    assert script == str(ROOT / "scripts" / "predict.py") and runs_this_python(python, Path.cwd())
    assert shlex.split(sibling("tune"))[1:] == ["-m", "unet_pl.cli.tune"]  # there is no scripts/tune.py
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # the environment activated: plain python
    if (Path(sys.executable).parent / "python").exists():
        assert sibling("predict") == f"python {ROOT / 'scripts' / 'predict.py'}"
    monkeypatch.setenv("PATH", "/nonexistent")  # not activated (make's .venv): the interpreter's own path
    assert shlex.split(sibling("tune"))[0] in (sys.executable, os.path.relpath(sys.executable))
    monkeypatch.setattr(sys, "argv", ["/venv/bin/unet-train"])
    assert (sibling("predict"), sibling("tune")) == ("unet-predict", "unet-tune")


def test_init_starts_from_the_bundled_models_weights_and_refuses_another_shape(tmp_path, cache_dir):
    """--init pretrained: a new run whose U-Net starts at the bundled model's weights (--mode instance
    implied). With a learning rate of 1e-12 one epoch leaves them where they were, so best.ckpt holds the
    bundled weights; the same run without --init holds others. A model of another shape is one line."""
    from unet_pl.inference.checkpoint import PRETRAINED

    bundled = torch.load(PRETRAINED, map_location="cpu", weights_only=True)["state_dict"]
    bundled = {k: v for k, v in bundled.items() if k.startswith("unet.")}
    for init, out in ((["--init", "pretrained"], tmp_path / "tuned"), ([], tmp_path / "scratch")):
        mode = [] if init else ["--mode", "instance"]
        proc = run(train_cmd("--gpus", "0", "--epochs", "1", "--lr", "1e-12", "--tune", "off", *init, *mode, "--out", str(out),
                             cache=cache_dir), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = weights(out / "best.ckpt")
        far = max(float((got[k].float() - v.float()).abs().max()) for k, v in bundled.items())
        if init:
            assert "starting from the weights of the bundled model" in proc.stdout, proc.stdout
            assert far < 1e-5, far
            # the weights did not move, so no epoch beat them: said, with the starting score measured before the
            # first step, and best.ckpt's (what it was chosen by) not below it
            start = float(re.search(r"the starting weights on the validation images: val/loss ([0-9.]+)", proc.stdout)[1])
            said = re.search(r"warning: fine-tuning did not help .* scored val/loss ([0-9.]+) before the first step, and no "
                             r"epoch did better \(best.ckpt: ([0-9.]+)\)", proc.stdout)
            assert said and float(said[1]) == start and float(said[2]) >= start - 1e-4, proc.stdout
        else:
            assert far > 1e-2, far
            assert "starting weights" not in proc.stdout and "did not help" not in proc.stdout
    # from weights that training improves on (the untrained run's), at the default rate: no warning
    proc = run(train_cmd("--gpus", "0", "--epochs", "3", "--tune", "off", "--mode", "instance", "--init",
                         str(tmp_path / "scratch" / "best.ckpt"), "--out", str(tmp_path / "better"), cache=cache_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the starting weights on the validation images: val/loss" in proc.stdout and "did not help" not in proc.stdout
    # a notebook-mode model (one output) is not the bundled model's shape
    proc = run(train_cmd("--gpus", "0", "--epochs", "1", "--mode", "notebook", "--init", "pretrained", "--out",
                         str(tmp_path / "nb"), cache=cache_dir), cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "out_channels is 2, this run's 1" in err[0] and "--mode instance" in err[0], err
    assert not (tmp_path / "nb" / "best.ckpt").exists()


def test_an_interrupted_runs_best_epoch_is_the_one_best_ckpt_holds(tmp_path):
    """Stopped by a signal between an epoch's validation and its checkpoint: metrics.csv holds that epoch's lower
    val/loss, best.ckpt does not. The closing line names the epoch best.ckpt was saved at (read from the file, as
    Lightning wrote it), with its metrics; a run that was not interrupted keeps the metrics' best."""
    from types import SimpleNamespace

    import lightning.pytorch as pl

    from unet_pl import LitUNet
    from unet_pl.cli.run_folder import summarise

    logs = tmp_path / "logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,step,val/loss,val/iou\n0,1,0.40,0.5\n1,2,0.30,0.6\n2,3,0.25,0.7\n3,4,0.20,0.8\n")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(LitUNet(img_size=32))
    trainer.fit_loop.epoch_progress.current.completed = 2  # saved at the end of epoch 2
    trainer.save_checkpoint(tmp_path / "best.ckpt")
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 2
    args = SimpleNamespace(fast_dev_run=False, gpus=0, patience=10, epochs=6, max_time=None, again=[])
    fake = SimpleNamespace(callbacks=[], current_epoch=3, world_size=1)
    speed = SimpleNamespace(images_per_second=1.0)
    for signal_, want in (("SIGINT", "best epoch 2: val/loss 0.2500, val/iou 0.7000"), (None, "best epoch 3: val/loss 0.2000")):
        interrupt = SimpleNamespace(signal=signal_, saved_mid_epoch=False)
        lines = summarise(tmp_path, args, fake, SimpleNamespace(best_model_path=""), interrupt, speed, 1.0, []).splitlines()
        assert lines[0].startswith(want), lines


def test_init_says_when_the_starting_model_trained_on_this_runs_hold_out(tmp_path, cache_dir):
    """--init pretrained --holdout stratified on images of the bundled model's own set (the sample, from stage1_train):
    the sample's hold-out is computed from its 30 images, and the bundled model's run held out only some of them, so
    it trained on the rest: said, with the count from the two lists of held-out ids. On images of the user's own (none
    of which the starting run held out) nothing is said."""
    from unet_pl.cli.train import seen_by_start
    from unet_pl.data import SAMPLE_DIR
    from unet_pl.data.holdout import holdout_ids
    from unet_pl.inference.checkpoint import PRETRAINED

    theirs = torch.load(PRETRAINED, map_location="cpu", weights_only=True)["NucleiDataModule"]["holdout_ids"]
    mine = holdout_ids(SAMPLE_DIR)
    trained_on = [i for i in mine if i not in theirs]
    assert trained_on and len(trained_on) < len(mine)
    proc = run(train_cmd("--gpus", "0", "--epochs", "1", "--lr", "1e-12", "--tune", "off", "--init", "pretrained",
                         "--holdout", "stratified", "--out", str(tmp_path / "r"), cache=cache_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"warning: the bundled model was trained on {len(trained_on)} of this run's {len(mine)} held-out images"
            in proc.stdout), proc.stdout
    assert seen_by_start(["a", "b", "c"], ["a", "b", "c", "x"], ["a", "x"]) == 2  # same data: b and c were trained on
    assert seen_by_start(["a", "b"], ["a", "b", "c"], ["x", "y"]) == 0  # the user's own images: nothing known
