"""The ``predict`` section of ``scripts/benchmark.py``: how fast the bundled model segments large
microscopy images, stage by stage, against the network alone on the same pixels.

Test images are made from the bundled sample: mosaics of its fluorescence images (written as
16-bit TIFFs holding 12-bit data, as cameras write them) and of its H&E tissue (8-bit RGB TIFF),
``side`` x ``side`` pixels each. One fresh process times the stages on them in turn:

    read            tifffile decoding (``read_raw``)
    normalise       the model's intensity rule (``to_rgb8``: the bundled model's is recorded in it)
    network         the U-Net alone, channels-last, one forward pass per image, in the arithmetic
                    prediction uses (``--predict-precision``, default auto): the reference
    network float32 the same in float32, where that arithmetic is bfloat16 (what it gains)
    probabilities   network + sigmoid + tiling (``predict_images``; tiles above ``--tile``)
                    (these two: the better of two passes per image)
    TTA d4          the same with the eight dihedral views
    post-processing probabilities -> nuclei (``labels_from_probabilities``: watershed, size filter)
    outputs         label TIFF, nuclei.csv, summary.csv, submission.csv (``Outputs``)

then ``predict_folder`` end to end (by default, one image at a time, and with TTA) in fresh
processes of their own after a warm-up on two of the images, each with its peak memory: over a
folder of three times as many images (the default run: twelve, what a folder of a user's images
costs once the first has paid for the process's memory; TTA over the stage images). The rows
without TTA take the better of two passes over the folder, as the network's reference takes the
better of two passes per image; each pass is compared with the network alone timed in the same
process just before and just after it, on the folder's first images. This machine's speed can
drift by 15% within a minute (a VM's neighbours), so a ratio against a reference measured in
another process at another time says more about the drift than about the code.
Start-up is ``scripts/predict.py`` on one small image, wall clock, against ``python -c "import torch"``.
``--huge-side 16384`` adds one image of that side end to end (its peak memory is the row to read).
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..precision import autocast as precision_autocast
from ..precision import resolve as resolve_precision


def _peak_rss_mb() -> float:
    """This process's peak resident memory (since the last ``_reset_peak`` where Linux allows it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start the peak over at the current resident memory (Linux: ``clear_refs`` 5); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def mosaic(tiles: list[np.ndarray], side: int, seed: int = 0) -> np.ndarray:
    """A ``side`` x ``side`` image paved with randomly chosen ``tiles`` (same channel count), row by row."""
    rng = np.random.default_rng(seed)
    out = np.zeros((side, side, tiles[0].shape[2]), tiles[0].dtype)
    y = 0
    while y < side:
        x, row = 0, 0
        while x < side:
            t = tiles[rng.integers(len(tiles))]
            h, w = min(t.shape[0], side - y), min(t.shape[1], side - x)
            out[y:y + h, x:x + w] = t[:h, :w]
            x, row = x + w, max(row, h)
        y += row
    return out


def make_images(folder: Path, side: int, n: int = 4) -> list[Path]:
    """``n`` mosaics of the bundled sample in ``folder``: fluorescence as 12-bit data in 16-bit
    grey TIFFs, every fourth one H&E tissue as 8-bit RGB TIFF. Returns their paths."""
    import tifffile

    from ..data.holdout import image_modality
    from ..data.images import list_images, read_image
    from ..data import SAMPLE_DIR

    images = [read_image(p) for _, p in list_images(SAMPLE_DIR)]
    kinds = {m: [im for im in images if image_modality(im) == m] for m in ("fluorescence", "histology")}
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"mosaic_{i}_{side}.tif"
        if i % 4 == 3:
            tifffile.imwrite(path, mosaic(kinds["histology"], side, seed=i), photometric="rgb")
        else:
            grey = mosaic([im[..., :1] for im in kinds["fluorescence"]], side, seed=i)[..., 0]
            tifffile.imwrite(path, (grey.astype(np.uint16) * 16), photometric="minisblack")  # 12-bit camera data
        paths.append(path)
    return paths


def _clock(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def run_stages(cfg: dict) -> dict:
    """Seconds per stage over all of ``cfg["folder"]``'s images (see the module docstring)."""
    import torch

    from ..data.images import image_id, list_images
    from ..data.readers import read_raw, to_rgb8
    from ..inference.checkpoint import load_model
    from ..inference.outputs import Outputs, intensity_image
    from ..inference.predict import labels_from_probabilities, predict_images, to_input
    from ..inference.tiling import pad_to_multiple
    from ..perf import keep_freed_memory

    keep_freed_memory()
    net = load_model(device=cfg["device"]).eval()
    settings = net.settings.replace(tile=cfg["tile"], precision=cfg.get("precision", "auto"))
    bf16 = resolve_precision(settings.precision, cfg["device"]) == "bf16"
    paths = [p for _, p in list_images(cfg["folder"])]
    secs = dict.fromkeys(("read", "normalise", "network", "network32", "probabilities", "tta", "postprocess", "outputs"), 0.0)
    # warm-up on the first image: oneDNN builds its kernels for each new shape once
    with torch.inference_mode():
        warm = to_rgb8(read_raw(paths[0]), settings.intensity)
        for precision in ("32", settings.precision) if bf16 else ("32",):
            _network_pass(net, pad_to_multiple(to_input(warm, cfg["device"]))[0], cfg["device"], precision)
        next(predict_images(net, [warm], settings.decoded()))
    pixels = 0
    with tempfile.TemporaryDirectory() as out:
        outputs = Outputs(Path(out) / "submission.csv", out)
        for path in paths:
            t, raw = _clock(read_raw, path)
            secs["read"] += t
            t, image = _clock(to_rgb8, raw, settings.intensity)
            secs["normalise"] += t
            pixels += image.shape[0] * image.shape[1]
            x = pad_to_multiple(to_input(image, cfg["device"]))[0]
            secs["network"] += _network_pass(net, x, cfg["device"], settings.precision)
            secs["network32"] += _network_pass(net, x, cfg["device"], "32") if bf16 else 0.0
            del x
            (t1, prob), (t2, _) = (_clock(lambda: next(predict_images(net, [image], settings.decoded()))) for _ in range(2))
            secs["probabilities"] += min(t1, t2)
            if cfg["tta"]:
                t, _ = _clock(lambda: next(predict_images(net, [image], settings.decoded().replace(tta="d4"))))
                secs["tta"] += t
            t, labels = _clock(labels_from_probabilities, prob, settings)
            secs["postprocess"] += t
            intensity = intensity_image(raw)
            t, _ = _clock(outputs.add, image_id(path), image, intensity, labels, prob)
            secs["outputs"] += t
        t, _ = _clock(outputs.commit)
        secs["outputs"] += t
    return {"seconds": secs, "mpx": pixels / 1e6, "threads": torch.get_num_threads(),
            "precision": "bf16" if bf16 else "32"}


def _network_pass(net, x, device: str, precision: str = "auto") -> float:
    """Seconds of the U-Net alone on the input ``x`` in ``precision`` (as prediction resolves it): the better
    of two passes (the first may also pay for fresh memory: on a VM whose host took back freed pages,
    about 10 s per GiB first touched was measured)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(2):
        with torch.inference_mode(), precision_autocast(precision, device):
            sync()
            t, _ = _clock(net, x)
            sync()
        best = min(best, t)
    return best


def _network_seconds(net, paths: list[Path], settings, device: str) -> tuple[float, float]:
    """The U-Net alone over ``paths``, as the stage row times it: ``(seconds, megapixels)``."""
    from ..data.readers import read_raw, to_rgb8
    from ..inference.predict import to_input
    from ..inference.tiling import pad_to_multiple

    seconds, pixels = 0.0, 0
    for path in paths:
        image = to_rgb8(read_raw(path), settings.intensity)
        pixels += image.shape[0] * image.shape[1]
        seconds += _network_pass(net, pad_to_multiple(to_input(image, device))[0], device, settings.precision)
    return seconds, pixels / 1e6


def run_end_to_end(cfg: dict) -> dict:
    """``predict_folder`` over the folder in this fresh process: wall seconds and peak memory, and the
    network alone on the folder's first ``cfg["reference"]`` images just before and after it."""
    import logging

    from ..data.images import list_images
    from ..data.readers import image_size
    from ..inference.checkpoint import load_model
    from ..inference.folder import predict_folder

    logging.disable(logging.WARNING)
    rss0 = _peak_rss_mb()
    net = load_model(device=cfg["device"]).eval()
    settings = net.settings.replace(tile=cfg["tile"], tta=cfg.get("tta_mode", "none"), precision=cfg.get("precision", "auto"))
    entries = list_images(cfg["folder"])
    pixels = sum(np.prod(image_size(p)) for _, p in entries)
    first = [p for _, p in entries[:cfg.get("reference", 0)]]
    with tempfile.TemporaryDirectory() as out:
        if cfg.get("warmup", True):  # oneDNN builds its kernels for a new image size and thread count once;
            # start-up is its own row. Two images, so that two workers each build theirs.
            predict_folder(net, cfg["folder"], Path(out) / "warm.csv", ids=[i for i, _ in entries[:2]], settings=settings,
                           progress=False, at_once=cfg.get("at_once"))
        # passes of predict_folder with the network alone timed before, between and after them
        references = [_network_seconds(net, first, settings, cfg["device"])] if first else []
        passes, peak = [], 0.0
        for _ in range(cfg.get("repeats", 1)):
            _reset_peak()  # the peak of predict_folder, not of the passes around it
            start = time.perf_counter()
            stats = predict_folder(net, cfg["folder"], Path(out) / "submission.csv", settings=settings, out_dir=out,
                                   progress=False, at_once=cfg.get("at_once"))
            passes.append(time.perf_counter() - start)
            peak = max(peak, _peak_rss_mb())
            if first:
                references.append(_network_seconds(net, first, settings, cfg["device"]))
    best = int(np.argmin(passes))  # the better pass, as the network's reference takes the better of two passes
    return {"seconds": passes[best], "passes": passes, "mpx": float(pixels) / 1e6, "peak_mb": peak, "model_mb": rss0,
            "nuclei": stats["nuclei"], "images": len(entries),
            "network": references[best:best + 2] if first else None, "references": references}


def startup(repeats: int = 3) -> tuple[float, float]:
    """(best wall seconds of ``python -c "import torch"``, of ``scripts/predict.py`` on one small image)."""
    from ..data.images import list_images
    from ..data import SAMPLE_DIR

    small = list_images(SAMPLE_DIR)[0][1]
    script = Path(__file__).resolve().parents[2] / "scripts" / "predict.py"
    predict = [sys.executable, str(script) if script.is_file() else "-m", *([] if script.is_file() else ["unet_pl.cli.predict"])]

    def best(cmd: list[str]) -> float:
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                subprocess.run([*cmd] + ([] if cmd[1] == "-c" else ["--data-dir", str(small), "--out-dir", out, "--gpus", "0"]),
                               check=True, capture_output=True)
                times.append(time.perf_counter() - start)
        return min(times)

    return best([sys.executable, "-c", "import torch"]), best(predict)


def report(spawn, device: str, side: int, n: int, tile: int, huge_side: int | None, tta: bool = True,
           precision: str = "auto") -> None:
    """Print the predict table; ``spawn(cfg)`` runs a measurement in a fresh process (benchmark's ``_spawn``)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, side, n)
        base = {"device": device, "folder": str(folder), "tile": tile, "precision": precision}
        stages = spawn({**base, "kind": "predict_stages", "tta": tta})
        folder3 = Path(tmp) / "folder"  # three times as many, for the end-to-end rows
        make_images(folder3, side, 3 * n)
        many = {**base, "folder": str(folder3), "kind": "predict_e2e", "reference": n, "repeats": 2}
        e2e = spawn(many)
        e2e_one = spawn({**many, "at_once": 1})
        e2e_tta = spawn({**base, "kind": "predict_e2e", "tta_mode": "d4", "reference": n}) if tta else None
        huge = None
        if huge_side:
            big = Path(tmp) / "huge"
            make_images(big, huge_side, 1)
            huge = spawn({**base, "folder": str(big), "kind": "predict_e2e", "warmup": False}, timeout=3600)
    torch_s, predict_s = startup()
    he = len(range(3, n, 4))
    print(f"\n### predict: {n} images of {side} x {side} ({n * side * side / 1e6:.1f} Mpx; {n - he} fluorescence as 12-bit "
          f"data in 16-bit TIFF, {he} H&E as RGB TIFF), bundled model, tile {tile}, {device}, --precision {precision}"
          f"{' (here ' + {'bf16': 'bfloat16', '32': 'float32'}[stages['precision']] + ')' if stages else ''}\n")
    print("| stage | seconds | Mpx/s | vs network alone |\n|---|---:|---:|---:|")
    if stages:
        s, mpx = stages["seconds"], stages["mpx"]
        net = s["network"]
        names = [("read", "read (tifffile)"), ("normalise", "normalise (the model's intensity rule)"), ("network", "**network alone** (reference)"),
                 *([("network32", "network alone in float32")] if s["network32"] else []),
                 ("probabilities", "probabilities (network, sigmoid, tiles)"), ("tta", "probabilities with TTA d4 (8 views)"),
                 ("postprocess", "post-processing (watershed, size filter)"), ("outputs", "outputs (label TIFF, CSVs)")]
        for key, label in names:
            if key == "tta" and not tta:
                continue
            ratio = f"{net / s[key]:.2f}x" if key in ("probabilities", "network", "network32") else (f"{8 * net / s[key]:.2f}x of 8 views" if key == "tta" else "")
            print(f"| {label} | {s[key]:.2f} | {mpx / s[key]:.2f} | {ratio} |")
    references = []
    for label, res, views in (("end to end (`predict_folder`)", e2e, 1), ("end to end, one image at a time (`at_once=1`)", e2e_one, 1),
                              ("end to end, TTA d4", e2e_tta, 8)):
        if res:
            # against the network alone in the same process, before and after (the mean of the two rates)
            rates = [mpx / sec for sec, mpx in res["network"]]
            passes = res.get("passes", [res["seconds"]])
            references.append(f"{label}: " + " / ".join(f"{mpx / sec:.2f}" for sec, mpx in res.get("references", res["network"]))
                              + (f" (passes {', '.join(f'{p:.2f}' for p in passes)} s)" if len(passes) > 1 else ""))
            ratio = res["mpx"] / res["seconds"] * views / (sum(rates) / len(rates))
            print(f"| **{label}, {res['images']} images** | {res['seconds']:.2f} | {res['mpx'] / res['seconds']:.2f} | "
                  f"**{ratio:.2f}x**{' of 8 views' if views == 8 else ''} |")
    print("\n| measure | value |\n|---|---:|")
    print(f"| start-up: `python -c \"import torch\"` | {torch_s:.2f} s |")
    print(f"| start-up: `scripts/predict.py` on one 256 x 256 image, whole run | {predict_s:.2f} s ({predict_s / torch_s:.2f}x) |")
    if e2e:
        print(f"| peak memory, end to end ({side} x {side}) | {e2e['peak_mb']:.0f} MiB |")
    if e2e_one:
        print(f"| peak memory, end to end, one image at a time | {e2e_one['peak_mb']:.0f} MiB |")
    if e2e_tta:
        print(f"| peak memory, end to end with TTA d4 | {e2e_tta['peak_mb']:.0f} MiB |")
    if huge:
        print(f"| {huge_side} x {huge_side} ({huge_side ** 2 / 1e6:.0f} Mpx) end to end | {huge['seconds']:.1f} s, "
              f"{huge['mpx'] / huge['seconds']:.2f} Mpx/s, {huge['nuclei']:,} nuclei, peak memory {huge['peak_mb']:.0f} MiB |")
    elif huge_side:
        print(f"| {huge_side} x {huge_side} end to end | failed |")
    if references:
        print("\nEnd-to-end rows: the better of their passes (two without TTA, one with), against the network alone "
              "timed in the same process just before and after that pass; the network's rates around every pass, "
              "Mpx/s: " + "; ".join(references))
    print(f"\n(threads: {stages['threads'] if stages else '?'}; cores: {os.cpu_count()})")
