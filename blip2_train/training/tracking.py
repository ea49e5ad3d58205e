"""What a run reports beyond its losses: throughput, GPU memory, and a table of validation samples.

- ``train/samples_per_s`` and ``train/tokens_per_s`` (all ranks together: this rank's count times
  the world size; every rank gets the same batch size), measured over the steps between two log
  steps, so no step waits for the device: on GPU the wall time between log steps is the true
  step time once the queue of launched kernels is full. Tokens are the text tokens that are not
  padding (the Q-Former text, or the LLM text in stage 2); their count stays on the device and
  is read at log steps only.
- Stage 2 also logs ``train/llm_tokens_per_s``: the tokens the LLM reads, the bridge's visual tokens
  (``visual_tokens`` per sample) plus the text tokens. ``summary()`` gives the mean samples/s and
  LLM tokens/s over the run's log intervals after the first (which holds the start-up), for metrics.json.
- ``train/gpu_mem_max_gb``: ``torch.cuda.max_memory_allocated`` on CUDA only.
- At each validation, the module's ``val_samples`` (a few images with their top retrieved caption
  in stage 1, or their generated caption in stage 2) go to ``run_dir/val_samples.jsonl`` always,
  and to a ``wandb.Table`` or a tensorboard markdown table when that logger is on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

NUM_SAMPLES = 4  # images per validation table


class Throughput(Callback):
    def __init__(self, log_every_n_steps: int):
        self.every = max(1, log_every_n_steps)
        self._start: float | None = None
        self._samples = 0
        self._tokens: torch.Tensor | None = None
        self._intervals: list[tuple[float, float, float]] = []  # (seconds, samples, LLM tokens) per interval

    def summary(self) -> dict[str, float]:
        """Mean ``train/samples_per_s`` (and LLM tokens/s in stage 2) over the log intervals after the first."""
        kept = self._intervals[1:] or self._intervals
        seconds = sum(k[0] for k in kept)
        if not seconds:
            return {}
        out = {"train/samples_per_s_mean": sum(k[1] for k in kept) / seconds}
        if any(k[2] for k in kept):
            out["train/llm_tokens_per_s_mean"] = sum(k[2] for k in kept) / seconds
        return out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch["image"].shape[0]
        mask = batch.get("llm_attention_mask", batch.get("attention_mask"))
        if mask is not None:
            tokens = mask.sum()  # stays on the device
            self._tokens = tokens if self._tokens is None else self._tokens + tokens
        if trainer.global_step % self.every:
            return
        elapsed = time.perf_counter() - self._start
        world = trainer.world_size
        pl_module.log("train/samples_per_s", self._samples * world / elapsed, on_step=True, on_epoch=False)
        llm_tokens = 0.0
        if self._tokens is not None:
            pl_module.log("train/tokens_per_s", self._tokens.float() * world / elapsed, on_step=True,
                          on_epoch=False)
            visual = getattr(pl_module, "visual_tokens", None)
            if visual is not None and "llm_attention_mask" in batch:  # stage 2: what the LLM reads
                llm_tokens = float(self._tokens) + visual * self._samples  # the log step's one sync
                pl_module.log("train/llm_tokens_per_s", llm_tokens * world / elapsed, on_step=True, on_epoch=False)
        self._intervals.append((elapsed, self._samples * world, llm_tokens * world))
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            pl_module.log("train/gpu_mem_max_gb", torch.cuda.max_memory_allocated(pl_module.device) / 2**30,
                          on_step=True, on_epoch=False)
        self._start, self._samples, self._tokens = time.perf_counter(), 0, None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start = None  # validation time is not training time

    on_validation_end = on_validation_start


class ValidationSamples(Callback):
    """Writes the module's ``val_samples`` (list of dicts with ``image`` [3, H, W] and text fields)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "val_samples.jsonl"

    def on_validation_end(self, trainer, pl_module) -> None:
        rows = getattr(pl_module, "val_samples", None)
        if trainer.sanity_checking or not rows or not trainer.is_global_zero:
            return
        step = trainer.global_step
        columns = [k for k in rows[0] if k != "image"]
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **{k: row[k] for k in columns}}) + "\n")
        for logger in trainer.loggers:
            name = type(logger).__name__
            if name == "WandbLogger":
                import wandb

                data = [[wandb.Image(_to_uint8(row["image"]))] + [row[k] for k in columns] for row in rows]
                logger.experiment.log({"val/samples": wandb.Table(columns=["image", *columns], data=data),
                                       "trainer/global_step": step})
            elif name == "TensorBoardLogger":
                header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                body = "".join("| " + " | ".join(str(row[k]) for k in columns) + " |\n" for row in rows)
                logger.experiment.add_text("val/samples", header + body, step)


def _to_uint8(image: torch.Tensor):
    """A normalised [3, H, W] image back to a viewable HxWx3 uint8 array (min-max per image)."""
    image = image.float()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-6)
    return (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
