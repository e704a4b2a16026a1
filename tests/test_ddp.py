"""DDP on the CPU: two gloo processes through the real CLI train one epoch and end with the same weights.

Lightning's ``strategy="ddp"`` re-runs the launching script for rank 1, so the test writes a
small script that wraps ``unet_pl.cli.train.main``: it counts cache builds (``prepare_data``
must decode once, on rank 0) and saves every rank's weights at the end of training.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import lightning.pytorch as pl
    import torch
    import unet_pl.data.module as data
    from unet_pl.cli.train import main

    here = Path(sys.argv[1])
    build_cache = data.build_cache

    def counted_build_cache(*args, **kwargs):
        with open(here / "cache_builds.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        return build_cache(*args, **kwargs)

    data.build_cache = counted_build_cache

    class SaveRankWeights(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            torch.save(pl_module.state_dict(), here / f"rank{trainer.global_rank}.pt")

        def on_fit_end(self, trainer, pl_module):  # after the post-processing was chosen (on rank zero)
            (here / f"rank{trainer.global_rank}.json").write_text(json.dumps(pl_module.hparams.postprocess))

    main(sys.argv[2:], callbacks=(SaveRankWeights(),))
''')


def test_two_cpu_processes_agree_and_build_the_cache_once(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    cache = tmp_path / "cache"
    cmd = [sys.executable, str(script), str(tmp_path), "--gpus", "0", "--cpu-processes", "2", "--epochs", "1",
           "--img-size", "32", "--batch-size", "4", "--num-workers", "0", "--out", str(tmp_path / "run"), "--cache-dir", str(cache),
           "--tune", "on"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert len((tmp_path / "cache_builds.txt").read_text().splitlines()) == 1
    assert len(list(cache.glob("*.npz"))) == 1
    # rank zero alone writes the run folder and prints the summary
    assert (tmp_path / "run" / "best.ckpt").is_file() and (tmp_path / "run" / "curves.png").is_file()
    assert proc.stdout.count("best epoch") == 1 and "2 CPU processes" in proc.stdout
    # the post-processing chosen on rank zero reached every rank, and the checkpoint
    chosen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert chosen[0] is not None and chosen[0] == chosen[1]
    assert torch.load(tmp_path / "run" / "best.ckpt", weights_only=True)["hyper_parameters"]["postprocess"] == chosen[0]
