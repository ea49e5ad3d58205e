"""Callbacks: atomic last.ckpt writing and the record of the latest validation metrics."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch
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
        # SLURM's pre-timeout signal (#SBATCH --signal, which submitit sets to the same signal,
        # blip2_train.training.cluster.requeue_signal): save at the end of the step, then requeue. It replaces
        # submitit's own handler, which would requeue without saving.
        from blip2_train.training.cluster import requeue_signal

        self._requeue = False
        if threading.current_thread() is threading.main_thread():
            sig = requeue_signal()
            signal.signal(sig, self._on_requeue_signal)
            log.info("on %s (SLURM's pre-timeout signal): checkpoint at the end of the step, then requeue",
                     sig.name)

    def _on_requeue_signal(self, signum, frame) -> None:
        log.info("%s: checkpointing at the end of this step, then requeueing", signal.Signals(signum).name)
        self._requeue = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        requeue, sigterm = self._stop_flags(trainer)
        periodic = self.every_n_steps and step % self.every_n_steps == 0
        if requeue or sigterm:
            self._save_for_stop(trainer)
            trainer.should_stop = True
            job = os.environ.get("SLURM_JOB_ID")
            if requeue and job and trainer.is_global_zero:
                done = subprocess.run(["scontrol", "requeue", job], check=False)
                log.info("scontrol requeue %s: exit status %d", job, done.returncode)
        elif periodic and step != self._saved_step:
            self.save(trainer)

    def _stop_flags(self, trainer) -> tuple[bool, bool]:
        """(requeue, sigterm), the same on every rank. A signal reaches each process at its own moment,
        so one rank can see it a step before another; saving is collective (barriers, FSDP's sharded
        write), so a rank that saved alone would wait for peers that went on to the next step's
        all-reduce, and the job would hang until the scheduler killed it, its last steps unsaved. One
        small all-reduce per step (Lightning already syncs once per step for SIGTERM in DDP) makes a
        signal on any rank stop all of them at the same step."""
        flags = (self._requeue, bool(getattr(trainer, "received_sigterm", False)))
        if trainer.world_size == 1:
            return flags
        summed = trainer.strategy.reduce(
            torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device), reduce_op="sum")
        requeue, sigterm = (bool(v) for v in summed.tolist())
        if requeue and not self._requeue:
            log.info("another rank received SLURM's pre-timeout signal: checkpointing, then requeueing")
        return requeue, sigterm

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


def _rng_state() -> dict:
    """This process's random states (torch CPU and current CUDA device, Python, NumPy) as plain data."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class ResumeRNG(Callback):
    """Every rank's random states go into the checkpoint; a resumed run restores its rank's just before
    its first training step, so dropout and the ITM negatives draw what an uninterrupted run draws."""

    def __init__(self):
        self._pending: list | None = None

    def state_dict(self) -> dict:
        import torch.distributed as dist

        state = _rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, state)  # every rank writes a checkpoint's state (dump_checkpoint)
            return {"rng_states": gathered}
        return {"rng_states": [state]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        states, self._pending = self._pending, None
        if not states:
            return
        if len(states) != trainer.world_size:
            log.warning("the checkpoint holds random states of %d ranks, this run has %d: not restored (the run "
                        "continues with fresh draws)", len(states), trainer.world_size)
            return
        _set_rng_state(states[trainer.global_rank])
