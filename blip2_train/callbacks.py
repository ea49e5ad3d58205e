"""Callbacks: atomic last.ckpt writing and the record of the latest validation metrics."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

VAL_PREFIXES = ("itc/", "itm/", "val/", "cider", "bleu4")


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
        if trainer.is_global_zero:
            if tmp.is_dir() or tmp.is_file():
                if final.is_dir():  # sharded (FSDP) checkpoints are directories
                    import shutil

                    shutil.rmtree(final)
                os.replace(tmp, final)
        trainer.strategy.barrier("atomic_checkpoint_done")
        self._saved_step = trainer.global_step
        return final

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._saved_step:
            self.save(trainer)

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
