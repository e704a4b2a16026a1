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
    monkeypatch.setattr(AdaptiveThreads, "MAX_SPLIT_THREADS", 1)  # 2 threads: the chooser, as on a larger machine
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
        def on_train_batch_end(self, trainer, module, *args):
            seen.append(next(c for c in trainer.callbacks if isinstance(c, AdaptiveThreads)).chooser)
            seen.append(None if module.micro_batches == 1 else module.micro_batches)

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


def test_small_cpus_train_in_micro_batches_and_validate_on_all_threads():
    """On 2 threads a CPU fit runs its steps as 4 micro-batches on one torch thread each, validates
    on both threads, and ends with the thread count and whole batches it started with."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from unet_pl import LitUNet

    model = LitUNet(img_size=32)
    batch = {"image": torch.rand(4, 3, 32, 32), "mask": (torch.rand(4, 1, 32, 32) > 0.5).float()}
    steps, validations = [], []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            steps.append((module.micro_batches, torch.get_num_threads()))

        def on_validation_batch_end(self, trainer, *args):
            validations.append(torch.get_num_threads())

    start = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             callbacks=[Spy()])
        trainer.fit(model, DataLoader([batch] * 2, batch_size=None), DataLoader([batch], batch_size=None))
        assert steps == [(4, 1)] * 4
        assert validations == [2, 2]
        assert torch.get_num_threads() == 2 and model.micro_batches == 1
    finally:
        torch.set_num_threads(start)


@pytest.mark.parametrize("head", ["mask", "mask+boundary"])
def test_micro_batches_train_to_the_same_weights_as_the_whole_batch(head):
    """A step split into micro-batches on threads (``LitUNet.micro_batches``) is the whole batch's
    step: after three optimizer steps with gradient accumulation and clipping, through a real
    Trainer, the weights equal those of the unsplit run up to float rounding (uneven parts: 7
    images in 3 parts), and the logged training loss is the batch's."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from unet_pl import LitUNet

    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.rand(7, 3, 32, 32, generator=g),
                "mask": (torch.rand(7, 1, 32, 32, generator=g) > 0.5).float(),
                "boundary": (torch.rand(7, 1, 32, 32, generator=g) > 0.9).float()} for _ in range(6)]

    def fit(parts: int) -> tuple[dict, float]:
        torch.manual_seed(1)
        model = LitUNet(img_size=32, head=head, tune=False)
        model.micro_batches = parts
        model.configure_callbacks = lambda: []  # the parts are set here, not by AdaptiveThreads
        trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                             accumulate_grad_batches=2, gradient_clip_val=0.05, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, DataLoader(batches, batch_size=None))
        return {k: v.clone() for k, v in model.state_dict().items()}, float(trainer.callback_metrics["train/loss_epoch"])

    whole, whole_loss = fit(1)
    split, split_loss = fit(3)
    start = LitUNet(img_size=32, head=head).state_dict()
    moved = max(float((whole[k] - start[k]).abs().max()) for k in whole if k in start and whole[k].is_floating_point())
    assert moved > 1e-4  # the runs trained (else equal weights would prove nothing)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-6, msg=k)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)


def test_a_compiled_network_keeps_whole_batches():
    """torch.compile'd code is not run from several threads at once: with a compiled U-Net the
    callback keeps whole batches and lets the thread chooser adapt instead."""
    from types import SimpleNamespace

    import torch

    from unet_pl import LitUNet
    from unet_pl.callbacks import AdaptiveThreads

    start = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for compiled in (False, True):
            model = LitUNet(img_size=32)
            if compiled:
                model.unet.compile()  # lazy: nothing is compiled until a forward pass
            callback = AdaptiveThreads()
            callback.on_train_start(SimpleNamespace(world_size=1), model)
            assert (model.micro_batches, callback.chooser is None) == ((1, False) if compiled else (4, True))
            callback.on_train_end(None, model)
            assert model.micro_batches == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(start)
