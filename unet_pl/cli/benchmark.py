"""Benchmark: training and inference images/s and peak memory, loader throughput, and the seed's
Keras model on the same batches when TensorFlow is installed. Prints one Markdown table.

Every measurement runs in a fresh subprocess, so peak memory is its own and nothing warms
another's caches. On CUDA, timings use CUDA events after a warm-up, not wall clock around
asynchronous calls.

    python scripts/benchmark.py                   # the table for this machine
    python scripts/benchmark.py --batch-sizes 16 64 --steps 40 --keras auto
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from ..precision import PREDICT_PRECISIONS


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(batch_size: int, size: int, n: int, seed: int = 0) -> list[dict]:
    """``n`` pre-collated batches of random uint8 images and masks (the batch contract)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g),
            "mask": torch.randint(0, 2, (batch_size, 1, size, size), dtype=torch.uint8, generator=g),
        }
        for _ in range(n)
    ]


def run_train(cfg: dict) -> dict:
    """Images/s of LitUNet's real training step under a Lightning Trainer."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    from unet_pl.lit import LitUNet

    cuda = cfg["device"] == "cuda"
    batches = _batches(cfg["batch_size"], cfg["size"], 4)
    total = cfg["warmup"] + cfg["steps"]

    class Pre(Dataset):  # pre-collated batches: the step is measured, not the collate
        def __len__(self):
            return total

        def __getitem__(self, i):
            return batches[i % len(batches)]

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            if idx == cfg["warmup"]:
                self.start = _mark(cuda)

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            if idx == total - 1:
                self.end = _mark(cuda)

    torch.manual_seed(0)
    model = LitUNet(channels_last=cfg["channels_last"], img_size=cfg["size"])
    if cfg.get("compile"):  # as train.py --compile MODE does it
        model.unet.compile(mode=None if cfg["compile"] == "default" else cfg["compile"])
    clock = Clock()
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision=cfg["precision"], max_steps=total,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[clock], num_sanity_val_steps=0, limit_val_batches=0, benchmark=cuda,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
    loader = DataLoader(Pre(), batch_size=None, pin_memory=cuda)
    trainer.fit(model, train_dataloaders=loader)
    seconds = _elapsed(clock.start, clock.end, cuda)
    mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb() - rss0
    return {"img_s": cfg["steps"] * cfg["batch_size"] / seconds, "mem_mb": mem}


def run_infer(cfg: dict) -> dict:
    """Images/s of a forward pass (no grad) of the UNet, as prediction runs it."""
    import torch

    from unet_pl.lit import LitUNet
    from unet_pl.perf import keep_freed_memory

    cuda = cfg["device"] == "cuda"
    dev = torch.device(cfg["device"])
    torch.backends.cudnn.benchmark = cuda
    if not cuda:
        keep_freed_memory()  # as prediction on the CPU does
    model = LitUNet(channels_last=cfg["channels_last"]).eval().to(dev)
    batches = [model.prepare_images(b["image"].to(dev)) for b in _batches(cfg["batch_size"], cfg["size"], 2)]
    dtype = torch.bfloat16 if cfg["precision"].startswith("bf16") else (torch.float16 if cfg["precision"].startswith("16") else None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(cfg["warmup"] + cfg["steps"]):
            if i == cfg["warmup"]:
                start = _mark(cuda)
            model(batches[i % 2])
        end = _mark(cuda)
    seconds = _elapsed(start, end, cuda)
    mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb() - rss0
    return {"img_s": cfg["steps"] * cfg["batch_size"] / seconds, "mem_mb": mem}


def run_loader(cfg: dict) -> dict:
    """Images/s the data module's training loader delivers on its own (augmentation included)."""
    from unet_pl.data import NucleiDataModule

    dm = NucleiDataModule(data_dir=cfg.get("data_dir"), img_size=cfg["size"], batch_size=cfg["batch_size"],
                          num_workers=cfg["num_workers"], augment="default")
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()  # one loader: its persistent workers start once
    n, start, epochs = 0, None, 0
    while n < cfg["steps"] * cfg["batch_size"] * 10 and epochs < 1000:
        for i, batch in enumerate(loader):
            if start is None:  # worker start-up is not throughput
                start = time.perf_counter()
                continue
            n += batch["image"].shape[0]
        epochs += 1
    return {"img_s": n / (time.perf_counter() - start), "mem_mb": float("nan")}


def run_keras(cfg: dict) -> dict:
    """The seed notebook's Keras model on TensorFlow, trained with model.fit on the same shapes."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    from unet_pl.keras.seed import build_seed_model

    model = build_seed_model(cfg["size"])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    bs, total = cfg["batch_size"], cfg["warmup"] + cfg["steps"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (bs * 4, cfg["size"], cfg["size"], 3)).astype(np.uint8)
    y = rng.integers(0, 2, (bs * 4, cfg["size"], cfg["size"], 1)).astype(np.float32)
    xs, ys = np.concatenate([x] * (total // 4 + 1))[: bs * total], np.concatenate([y] * (total // 4 + 1))[: bs * total]

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == cfg["warmup"]:
                self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch == total - 1:
                self.end = time.perf_counter()

    clock = Clock()
    rss0 = _rss_mb()
    model.fit(xs.astype(np.float32), ys, batch_size=bs, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
    return {"img_s": cfg["steps"] * bs / (clock.end - clock.start), "mem_mb": _peak_rss_mb() - rss0}


def _mark(cuda: bool):
    import torch

    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(start, end, cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    return end - start


def run_predict_stages(cfg: dict) -> dict:
    from .benchmark_predict import run_stages

    return run_stages(cfg)


def run_predict_e2e(cfg: dict) -> dict:
    from .benchmark_predict import run_end_to_end

    return run_end_to_end(cfg)


RUNNERS = {"train": run_train, "infer": run_infer, "loader": run_loader, "keras": run_keras,
           "predict_stages": run_predict_stages, "predict_e2e": run_predict_e2e}
#: What --only chooses from ("predict" is the whole predict section).
KINDS = ("train", "infer", "loader", "keras", "loaded", "predict")


def _worker(cfg: dict) -> None:
    os.environ.update(cfg.get("env", {}))
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(cfg["threads"])
    print("RESULT " + json.dumps(RUNNERS[cfg["kind"]](cfg)), flush=True)


def _spawn(cfg: dict, timeout: int = 900) -> dict | None:
    cmd = [sys.executable, "-m", "unet_pl.cli.benchmark", "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {cfg['kind']} timed out after {timeout} s", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {cfg['kind']} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def _has_tensorflow() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="training batch sizes (default 16 64)")
    p.add_argument("--img-size", type=int, default=128, help="square image side (default 128, the notebook's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--keras", choices=["auto", "yes", "no"], default="auto",
                   help="also time the seed's Keras model on TensorFlow (auto: when tensorflow is installed)")
    p.add_argument("--precisions", nargs="+", choices=["32-true", "bf16-mixed", "16-mixed"],
                   help="training (and inference) precisions (default: 32-true, bf16-mixed where the hardware computes "
                        "bfloat16 natively, and 16-mixed on CUDA)")
    p.add_argument("--layouts", nargs="+", choices=["nchw", "channels_last"], default=["nchw", "channels_last"],
                   help="memory layouts for the training rows (default: both)")
    p.add_argument("--compile", nargs="*", choices=["default", "reduce-overhead", "max-autotune"], default=None,
                   help="add torch.compile rows (bf16-mixed channels_last) in these modes (no mode given: default)")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers for the loader row (default 2)")
    p.add_argument("--data-dir", default=None, help="data for the loader row (default: the bundled sample)")
    p.add_argument("--only", nargs="+", choices=KINDS, help="run only these kinds of rows")
    p.add_argument("--loaded-steps", type=int, default=300,
                   help="loaded rows: timed training steps with and without a busy process beside (default 300)")
    p.add_argument("--predict-side", type=int, default=2048, help="predict section: side of its test images (default 2048)")
    p.add_argument("--predict-images", type=int, default=4, help="predict section: how many test images (default 4)")
    p.add_argument("--tile", type=int, default=2048, help="predict section: predict.py's --tile (default 2048)")
    p.add_argument("--predict-precision", choices=PREDICT_PRECISIONS, default="auto",
                   help="predict section: predict.py's --precision, for prediction and the network alone (default auto)")
    p.add_argument("--huge-side", type=int, default=None,
                   help="predict section: also one image of this side end to end, e.g. 16384 (minutes; peak memory)")
    args = p.parse_args(argv)
    if not args.worker and "predict" in (args.only or KINDS):
        from ..inference.tiling import check_tile

        try:
            check_tile(args.tile)
        except ValueError as e:
            p.error(f"--tile {args.tile}: {e}")
    if args.worker:
        _worker(json.loads(args.worker))
        return

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "benchmark: --device cuda asked for, but no CUDA device is visible; use --device cpu\n")
    kinds = set(args.only or KINDS)
    keras = args.keras == "yes" or (args.keras == "auto" and _has_tensorflow() and device == "cpu")
    base = {"device": device, "size": args.img_size, "steps": args.steps, "warmup": args.warmup}
    rows: list[tuple[str, dict, dict | None]] = []

    keras_ref: dict[int, float] = {}
    print(f"Machine: {_machine(device)}" + (f"; {args.img_size}x{args.img_size} images, {args.steps} timed steps after "
                                            f"{args.warmup} warm-up" if kinds - {"predict"} else ""))
    mem_label = "peak GPU MiB" if device == "cuda" else "peak RSS growth MiB"
    if kinds - {"predict"}:
        print(f"\n| what | images/s | {mem_label} | vs Keras/TF (same batch) |\n|---|---:|---:|---:|", flush=True)

    def measure(label: str, cfg: dict) -> dict | None:
        # each row prints as soon as it is measured, so a run cut short keeps what it has
        res = _spawn({**base, **cfg})
        rows.append((label, cfg, res))
        if res is None:
            print(f"| {label} | failed | | |", flush=True)
            return None
        ref = keras_ref.get(cfg.get("batch_size"))
        ratio = f"{res['img_s'] / ref:.2f}x" if ref and cfg["kind"] == "train" else ""
        mem = "" if res["mem_mb"] != res["mem_mb"] else f"{res['mem_mb']:.0f}"
        print(f"| {label} | {res['img_s']:.1f} | {mem} | {ratio} |", flush=True)
        return res

    from ..precision import native_bf16

    # Emulated bf16 (CPUs without AVX512-BF16 or AMX) runs several times slower than float32: rows
    # of it measure the emulation, so they are left out unless asked for with --precisions.
    bf16 = ["bf16-mixed"] if native_bf16(device == "cuda") else []
    if not bf16 and args.precisions is None and kinds & {"train", "infer"}:
        print("(no native bfloat16 on this machine: bf16-mixed rows left out; --precisions bf16-mixed adds them)")
    for bs in args.batch_sizes:
        if keras and "keras" in kinds:
            res = measure(f"Keras/TF seed model, fp32, batch {bs}", {"kind": "keras", "batch_size": bs})
            if res:
                keras_ref[bs] = res["img_s"]
        if "train" in kinds:
            precisions = args.precisions or ["32-true", *bf16] + (["16-mixed"] if device == "cuda" else [])
            for precision in precisions:
                for cl in [layout == "channels_last" for layout in args.layouts]:
                    layout = "channels_last" if cl else "NCHW"
                    measure(f"train {precision} {layout}, batch {bs}",
                            {"kind": "train", "batch_size": bs, "precision": precision, "channels_last": cl})
            for mode in ([] if args.compile is None else args.compile or ["default"]):
                measure(f"train bf16-mixed channels_last + torch.compile {mode}, batch {bs}",
                        {"kind": "train", "batch_size": bs, "precision": "bf16-mixed", "channels_last": True, "compile": mode})
    if "infer" in kinds:
        bs = max(args.batch_sizes)
        for precision in ["32-true", *bf16] if args.precisions is None else [p for p in args.precisions if p != "16-mixed"]:
            measure(f"inference {precision} channels_last, batch {bs}",
                    {"kind": "infer", "batch_size": bs, "precision": precision, "channels_last": True})
    if "loader" in kinds:
        measure(f"loader alone ({args.loader_workers} workers, default augmentation), batch 16",
                {"kind": "loader", "batch_size": 16, "num_workers": args.loader_workers, "data_dir": args.data_dir})
    if "loaded" in kinds and device == "cpu":
        # Another program holding one core (as `yes > /dev/null` would), against the same run quiet:
        # the default (unet_pl.callbacks.AdaptiveThreads: micro-batches on up to 4 cores, else ThreadChooser)
        # against whole batches on a fixed thread count (UNET_PL_ADAPTIVE_THREADS=0, the old behaviour).
        row = {"kind": "train", "batch_size": 16, "precision": "32-true", "channels_last": True, "steps": args.loaded_steps}
        ways = (("default (AdaptiveThreads)", {}), ("whole batches, fixed threads", {"UNET_PL_ADAPTIVE_THREADS": "0"}))
        quiet = {label: measure(f"train 32-true channels_last, batch 16, {args.loaded_steps} steps, quiet, {label}",
                                {**row, "env": env}) for label, env in ways}
        best = max((r["img_s"] for r in quiet.values() if r), default=None)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for label, env in ways:
                res = measure(f"same, one core busy with another process, {label}", {**row, "env": env})
                if res and quiet[label]:
                    print(f"|   (keeps {res['img_s'] / quiet[label]['img_s']:.0%} of its own quiet speed, "
                          f"{res['img_s'] / best:.0%} of the faster quiet row) | | | |", flush=True)
        finally:
            busy.kill()
    if "predict" in kinds:
        from .benchmark_predict import report

        report(_spawn, device, args.predict_side, args.predict_images, args.tile, args.huge_side,
               precision=args.predict_precision)


if __name__ == "__main__":
    main()
