"""Callbacks: atomic last.ckpt writing and the record of the latest validation metrics."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

VAL_PREFIXES = ("itc/", "itm/", "val/", "cider", "bleu4", "bridge/")
log = logging.getLogger(__name__)


class AtomicLastCheckpoint(Callback):
    """Writes ``dirpath/last.ckpt`` every ``every_n_steps`` and at the end of training.

    The checkpoint goes to a temporary file first and is renamed over ``last.ckpt``, so a kill
    in the middle of a save never leaves a broken ``last.ckpt``.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = None):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def save(self, trainer: L.Trainer) -> Path:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        final = self.dirpath / "last.ckpt"
        tmp = self.dirpath / ".last.ckpt.tmp"
        trainer.save_checkpoint(str(tmp))  # every rank calls it; the strategy writes on rank 0
        trainer.strategy.barrier("atomic_checkpoint")
        if trainer.is_global_zero and (tmp.is_dir() or tmp.is_file()):
            if final.is_dir():  # sharded (FSDP) checkpoints are directories
                import shutil

                shutil.rmtree(final)
            os.replace(tmp, final)
        trainer.strategy.barrier("atomic_checkpoint_done")
        self._saved_step = trainer.global_step
        return final

    def on_fit_start(self, trainer, pl_module) -> None:
        # SIGUSR1 is what SLURM sends before a time limit (--signal): save, then requeue.
        self._requeue = False
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def _on_sigusr1(self, signum, frame) -> None:
        log.info("SIGUSR1: checkpointing at the end of this step, then requeueing")
        self._requeue = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stopping = self._requeue or getattr(trainer, "received_sigterm", False)
        periodic = self.every_n_steps and step % self.every_n_steps == 0
        if stopping:
            self._save_for_stop(trainer)
            trainer.should_stop = True
            job = os.environ.get("SLURM_JOB_ID")
            if self._requeue and job and trainer.is_global_zero:
                subprocess.run(["scontrol", "requeue", job], check=False)
        elif periodic and step != self._saved_step:
            self.save(trainer)

    def _save_for_stop(self, trainer) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer)
        log.info("stopping at step %d after a signal; last.ckpt is up to date", trainer.global_step)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A SIGTERM that lands in validation or at an epoch's end: Lightning raises there
        (``SIGTERMException``) instead of finishing the step, so ``on_train_batch_end`` never sees it."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self._save_for_stop(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer)


class ValidationTracker(Callback):
    """Keeps the metrics of the latest validation and the step it ran at."""

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.last_step = -1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith(VAL_PREFIXES)}
        self.last_step = trainer.global_step
