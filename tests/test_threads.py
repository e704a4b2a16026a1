"""unet_pl.perf.ThreadChooser: all threads on a quiet machine, fewer when another program takes a core.

A simulated machine stands in for the clock: its step time depends on the thread count and on
whether a second program is running, with the figures measured on a 2-core EPYC (issue 17:
64.7 images/s quiet on 2 threads, 40.7 on 1; with a core taken 23.5 on 2 threads, 44.9 on 1).
"""
from __future__ import annotations

import numpy as np
import pytest

from unet_pl.perf import ThreadChooser

BATCH = 16
RATE = {(2, False): 64.7, (1, False): 40.7, (2, True): 23.5, (1, True): 44.9}  # images/s


def simulate(load: list[bool], seed: int = 0) -> tuple[ThreadChooser, list[int], float]:
    """Run ``len(load)`` steps; ``load[i]``: another program holds a core during step i.
    Returns the chooser, the thread count of each step and the images/s over the run."""
    rng = np.random.default_rng(seed)
    threads = [2]
    chooser = ThreadChooser(2, set_threads=lambda n: threads.append(n))
    used, total = [], 0.0
    for busy in load:
        n = threads[-1]
        seconds = BATCH / RATE[(n, busy)] * rng.uniform(0.95, 1.05)  # 5% jitter, as real steps have
        used.append(n)
        total += seconds
        chooser.step(seconds)
    return chooser, used, BATCH * len(load) / total


def test_quiet_machine_keeps_all_threads_and_its_speed():
    chooser, used, rate = simulate([False] * 4000)
    assert used[-1] == 2 and used.count(1) < 0.02 * len(used)  # only the short probes
    assert rate > 0.99 * RATE[(2, False)]  # the probes cost under 1%
    assert not chooser.changes


def test_a_busy_core_moves_training_to_one_thread_and_back_when_it_is_free():
    load = [False] * 500 + [True] * 3000 + [False] * 3000
    chooser, used, _ = simulate(load)
    loaded = used[500:3500]
    assert loaded[-1] == 1 and loaded.count(1) > 0.95 * len(loaded)  # found within a few windows
    assert used[-1] == 2 and used[3500:].count(2) > 0.7 * 3000  # back once the core is free (next probe)
    _, _, rate_loaded = simulate([True] * 3000)
    assert rate_loaded > 0.97 * RATE[(1, True)]  # within 3% of the best fixed choice for a loaded machine
    assert [n for _, n, _, _ in chooser.changes][:2] == [1, 2]


def test_jitter_alone_never_switches():
    rng = np.random.default_rng(3)
    chooser = ThreadChooser(4, set_threads=lambda n: None)
    assert chooser.fewer == 2
    for _ in range(5000):
        chooser.step(0.1 * rng.uniform(0.9, 1.1))  # same speed whatever the count
    assert not chooser.changes and chooser.current == 4


def test_litunet_fits_with_adaptive_threads_and_gives_the_threads_back(monkeypatch):
    """The callback comes with every LitUNet fit on the CPU, changes torch's thread count when its
    chooser says so, and restores the count the run started with."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from unet_pl import LitUNet
    from unet_pl.callbacks import AdaptiveThreads
    import unet_pl.callbacks as callbacks

    model = LitUNet(img_size=32)
    assert any(isinstance(c, AdaptiveThreads) for c in model.configure_callbacks())
    eager = lambda full: ThreadChooser(full, window=1, settle=0, first_probe=1)  # noqa: E731  probe after one step
    monkeypatch.setattr(callbacks, "ThreadChooser", eager)
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    start = torch.get_num_threads()
    real(2)
    try:
        batch = {"image": torch.rand(2, 3, 32, 32), "mask": (torch.rand(2, 1, 32, 32) > 0.5).float()}
        trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, DataLoader([batch] * 4, batch_size=None))
        assert 1 in calls and torch.get_num_threads() == 2
    finally:
        real(start)


@pytest.mark.parametrize("case", ["deterministic", "env"])
def test_deterministic_fits_and_the_off_switch_keep_the_thread_count(case, monkeypatch):
    """The thread count changes the order of float sums: a --deterministic run must not adapt;
    nor any run with UNET_PL_ADAPTIVE_THREADS=0."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from unet_pl import LitUNet
    from unet_pl.callbacks import AdaptiveThreads

    model = LitUNet(img_size=32)
    batch = {"image": torch.rand(2, 3, 32, 32), "mask": (torch.rand(2, 1, 32, 32) > 0.5).float()}
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(next(c for c in trainer.callbacks if isinstance(c, AdaptiveThreads)).chooser)

    if case == "env":
        monkeypatch.setenv("UNET_PL_ADAPTIVE_THREADS", "0")
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         deterministic=case == "deterministic",
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Spy()])
    try:
        trainer.fit(model, DataLoader([batch] * 2, batch_size=None))
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen and all(c is None for c in seen)
