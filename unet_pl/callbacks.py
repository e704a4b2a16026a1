"""Lightning callbacks for the run folder: interrupt safety, resumable randomness, throughput.

- ``SaveOnInterrupt``: Ctrl-C or SIGTERM leave a usable ``last.ckpt``. Lightning 2.6 turns
  SIGTERM into ``SIGTERMException`` at the next step boundary and calls ``on_exception``, but
  saves nothing itself (``ModelCheckpoint(save_on_exception=True)`` would write its *monitored*
  file name, i.e. overwrite ``best.ckpt`` with a non-best model).
- ``RngStateInCheckpoint``: the global RNG states travel in every checkpoint and are put back
  when a run resumes, so a resumed ``--deterministic`` run draws the same shuffles and dropout
  masks as an uninterrupted one.
- ``Throughput``: training images per second (forward + backward + data), for the summary.
- ``KeepFreedMemory``: on CPU runs, glibc keeps freed memory for reuse (``unet_pl.perf``), and
  gives it back when the run ends; logged when it takes effect.
- ``AdaptiveThreads``: on single-process CPU runs, training keeps its speed while another program
  holds a core: on up to 4 cores each step runs as micro-batches on threads of their own
  (``LitUNet.micro_batches``); on more, the number of threads follows the load
  (``unet_pl.perf.ThreadChooser``). Logged when it takes effect.
- ``TunePostprocessing``: at the end of fit, the post-processing is chosen on the validation
  images with the best weights (``unet_pl.inference.tune``) and stored in the model and its
  checkpoints, so prediction uses it by default.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback, EarlyStopping, WeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .perf import ThreadChooser, is_compiled, keep_freed_memory, release_freed_memory

log = logging.getLogger(__name__)


class SaveOnInterrupt(Callback):
    """On Ctrl-C or SIGTERM, make sure ``last_ckpt`` exists.

    After the first epoch, train.py's ``ModelCheckpoint(filename="last")`` has already written
    ``last.ckpt`` at the end of the last complete epoch: we keep it, so ``--resume last`` repeats the cut
    epoch from its start (deterministic, no half-seen epoch). Cut during the first epoch, we
    save the mid-epoch state instead (Lightning then finishes that epoch's remaining batches).
    """

    def __init__(self, last_ckpt: str | Path) -> None:
        self.last_ckpt = Path(last_ckpt)
        self.signal: str | None = None  # "SIGTERM" or "SIGINT" once interrupted
        self.saved_mid_epoch = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.signal = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            self.signal = "SIGINT"
        else:
            return  # a crash: a checkpoint of a broken state would only mislead a resume
        if self.last_ckpt.exists() or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if trainer.world_size > 1:
            # saving is collective (a barrier); ranks that are already gone would hang us
            log.warning("interrupted in the first epoch of a multi-process run: no last.ckpt to keep")
            return
        trainer.save_checkpoint(self.last_ckpt)
        self.saved_mid_epoch = True


class RngStateInCheckpoint(Callback):
    """Save torch/numpy/python RNG states in checkpoints; restore them when a fit resumes.

    The states are captured when the checkpoint is written (``ModelCheckpoint`` at the end of an
    epoch's validation) and set again in ``on_fit_start``: the last hook before the training
    data loader draws its seeds (the sanity check in between runs under ``isolate_rng``). In DDP
    the checkpoint holds rank zero's states, so only single-process runs resume bit-exactly.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        # plain lists and tensors, so the checkpoint still loads with torch.load(weights_only=True)
        states["numpy"] = [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss]
        version, state, gauss_py = states["python"]
        states["python"] = [version, list(state), gauss_py]
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss))
        if not torch.cuda.is_available():
            states.pop("torch.cuda", None)
        _set_rng_states(states)


class Throughput(Callback):
    """Training images per second over all ranks: images seen / time in training batches.

    The time runs from each training epoch's start to its last batch, so it counts data loading
    and the optimizer but not validation, checkpoints or plots.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._epoch_start: float | None = None
        self._last_batch_end: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._last_batch_end = time.perf_counter()
        self.images += int(batch["image"].shape[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_epoch()

    def _close_epoch(self) -> None:
        if self._epoch_start is not None and self._last_batch_end is not None:
            self.seconds += self._last_batch_end - self._epoch_start
        self._epoch_start = self._last_batch_end = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class KeepFreedMemory(Callback):
    """Keep freed memory for reuse during a CPU run (no page faults per activation, ``unet_pl.perf``);
    give the run's peak back to the system when it ends. A GPU step allocates no host activations."""

    def __init__(self) -> None:
        self.active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cpu" and keep_freed_memory():
            self.active = True
            # through Lightning's logger: shown beside its own lines, as a process-wide setting should be
            rank_zero_info("unet_pl: keeping freed memory for reuse during this CPU run, given back at its end "
                           "(unet_pl.perf; UNET_PL_KEEP_FREED_MEMORY=0 turns it off)")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.active:
            release_freed_memory()


class AdaptiveThreads(Callback):
    """Keep CPU training fast when another program takes a core (CPU, one process, more than one
    thread, not ``deterministic``; off with ``UNET_PL_ADAPTIVE_THREADS=0``).

    With up to ``MAX_SPLIT_THREADS`` threads (laptops, small servers) every training step runs as
    ``PARTS_PER_THREAD`` micro-batches per thread, each on its own thread with one torch thread
    (``LitUNet.micro_batches``, ``unet_pl.perf.run_parts``): parts share no barrier, so when
    another program holds a core the others keep working, and more runnable threads than cores
    keep a fair share of the machine. On 2 cores with one busy: 89% of the quiet speed against
    37% for whole batches on two torch threads, and the same quiet speed (``docs/performance.md``). With more
    threads, or a ``torch.compile``'d network, ``ThreadChooser`` picks between all and half of
    them from the step times.
    Validation runs on all threads. The count in force at the start is restored when training ends."""

    #: The split is used up to this many threads (measured on 2; more threads than this keep ``ThreadChooser``).
    MAX_SPLIT_THREADS = 4
    #: Micro-batches per thread: 2 kept the quiet speed of whole batches on all threads (1 lost 8%).
    PARTS_PER_THREAD = 2

    def __init__(self) -> None:
        self.chooser: ThreadChooser | None = None
        self.parts = 1
        self._start = 0.0
        self._threads = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import os

        off = os.environ.get("UNET_PL_ADAPTIVE_THREADS", "1").strip().lower() in ("0", "false", "no", "off")
        self._threads = torch.get_num_threads()
        # A deterministic run keeps its thread count and whole batches: both change the order of
        # float sums, and a resumed run must end on the same weights as an uninterrupted one.
        deterministic = torch.are_deterministic_algorithms_enabled()
        if off or deterministic or pl_module.device.type != "cpu" or trainer.world_size != 1 or self._threads < 2:
            return
        # torch.compile'd code is not run from several threads at once: a compiled network keeps whole batches
        if self._threads <= self.MAX_SPLIT_THREADS and not is_compiled(pl_module):
            self.parts = self.PARTS_PER_THREAD * self._threads
            pl_module.micro_batches = self.parts
            torch.set_num_threads(1)
            rank_zero_info(f"unet_pl: each training step runs as {self.parts} parts of the batch on {self.parts} threads "
                           "(keeps its speed while another program holds a core; UNET_PL_ADAPTIVE_THREADS=0 turns it off)")
        else:
            self.chooser = ThreadChooser(self._threads)
            rank_zero_info(f"unet_pl: training threads follow the machine's load ({self._threads} now, fewer while another "
                           "program holds a core; restored at the end; UNET_PL_ADAPTIVE_THREADS=0 keeps them fixed)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.chooser is not None:
            self.chooser.step(time.perf_counter() - self._start)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.parts > 1:
            torch.set_num_threads(self._threads)  # whole images forward only: all threads

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.parts > 1:  # set during fit only: back to the training steps
            torch.set_num_threads(1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: pl.LightningModule) -> None:
        if (self.chooser is not None or self.parts > 1) and torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        if self.parts > 1:
            pl_module.micro_batches = 1
        self.chooser = None
        self.parts = 1


class PatientEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` whose ``patience`` is the one it was made with, also after a
    resume (Lightning's restores the checkpoint's, so ``--resume ... --patience 20`` would keep the
    run's 5). Its state keeps Lightning's key, so runs of either resume with either."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "EarlyStopping", 1)


class WarmedEMA:
    """The averaging step of an exponential moving average of the weights whose decay warms up:
    ``d_n = min(decay, (1 + n) / (10 + n))`` after ``n`` averaged steps, the rule of TensorFlow's
    ``tf.train.ExponentialMovingAverage(decay, num_updates)``. Without it a run of a few hundred steps
    keeps mostly its random initial weights in the average (0.995 ** 120 = 0.55 of them after 120
    steps); with it the average follows the last ~10 % of a short run and is the plain EMA once
    ``n`` passes ``(10 decay - 1) / (1 - decay)`` (1,791 steps at 0.995). ``EMAAveraging``'s
    ``avg_fn`` (``torch.optim.swa_utils.AveragedModel``'s)."""

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)

    @torch.no_grad()
    def __call__(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        # on the weights' device: reading the count back to the CPU would stall a GPU once per tensor
        n = torch.as_tensor(num_averaged, device=averaged.device, dtype=torch.float32)
        d = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)
        return d * averaged + (1.0 - d) * current


class EMAAveraging(WeightAveraging):
    """Lightning's ``WeightAveraging`` with ``WarmedEMA(decay)``, updated after every optimizer step.
    Its state in checkpoints goes under the key of Lightning's ``EMAWeightAveraging``, which runs of
    earlier versions used, so that they resume without a warning."""

    def __init__(self, decay: float) -> None:
        super().__init__(avg_fn=WarmedEMA(decay))

    @property
    def state_key(self) -> str:
        return "EMAWeightAveraging"


#: How the tuner's line begins (train.py's closing summary gives it instead, with the values for the cut).
TUNED_LINE = "unet_pl: post-processing chosen on the validation images"


class TunePostprocessing(Callback):
    """At the end of training, choose the threshold, watershed seed threshold and minimum nucleus
    size on the data module's validation images at full size (``NucleiDataModule.validation_images``)
    by the competition score, with the weights of the best checkpoint on the training device; store
    the choice in the model (``LitUNet.set_postprocess``, every rank) and in ``best.ckpt`` and ``last.ckpt``.

    After fit: ``chosen`` (the dict) and ``score`` (its mean validation score), or None when there
    was nothing to tune on (no validation images, a fast dev run, no data module) or tuning failed
    (a warning says why; training's results stand).
    """

    def __init__(self) -> None:
        self.chosen: dict | None = None
        self.score: float | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end, not on_fit_end: the strategy (devices, DDP's process group) is still up
        dm = trainer.datamodule
        if trainer.fast_dev_run or dm is None or not hasattr(dm, "validation_images"):
            return
        result = self._tune(trainer, pl_module, dm) if trainer.is_global_zero else None
        result = trainer.strategy.broadcast(result, src=0)
        if result is not None:
            self.chosen, self.score = result
            pl_module.set_postprocess(self.chosen, self.score)
            plain = ", ".join(f"{k} {v:g}" for k, v in self.chosen.items() if not isinstance(v, dict))
            rank_zero_info(f"{TUNED_LINE} (score {self.score:.3f}), saved in the checkpoint and the model: {plain}")
        trainer.strategy.barrier("tune_postprocessing")

    def _tune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dm) -> tuple[dict, float] | None:
        from .inference.checkpoint import load_model, update_hyperparameters
        from .inference.tune import UNTRAINED_SCORE, tune_postprocessing, untrained_warning

        if dm.val_set is None or not len(dm.val_set):
            log.warning("no validation images: the post-processing keeps its defaults")
            return None
        cb = trainer.checkpoint_callback  # the first: the monitored one, whose best.ckpt the tuner reads
        best = Path(cb.best_model_path) if cb is not None and cb.best_model_path else None
        # every checkpoint written (best.ckpt; last.ckpt, by save_last or by a ModelCheckpoint of its own)
        written = {Path(p) for c in trainer.checkpoint_callbacks for p in (c.best_model_path, c.last_model_path) if p}
        try:
            device = trainer.strategy.root_device
            net = load_model(best, device=device) if best is not None and best.is_file() else pl_module.unet.eval()
            samples = ((image, labels) for _, image, labels in dm.validation_images())
            chosen, score = tune_postprocessing(net, samples, pl_module.settings)
            for path in written:
                if path.is_file():
                    update_hyperparameters(path, postprocess=chosen, tune_score=round(float(score), 4))
        except (ValueError, OSError, RuntimeError) as e:
            log.warning("could not choose the post-processing (%s: %s); the checkpoints keep the defaults", type(e).__name__, e)
            return None
        if score < UNTRAINED_SCORE:
            log.warning(untrained_warning(score))
        return chosen, score
