"""What stage 1 and stage 2 share: the frozen encoder, the Q-Former, the optimizer, bookkeeping."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from blip2_train.config import CUDA_GRAPH_MODES, question_to_qformer
from blip2_train.interop.state_dict import omitted_parts_of, rebuildable_parts, state_mismatch
from blip2_train.models.encoders import build_image_encoder
from blip2_train.models.qformer import QFormer, num_parameters
from blip2_train.models.tokenization import build_qformer_tokenizer
from blip2_train.training.optim import build_optimizer

log = logging.getLogger(__name__)


def as_config(cfg) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.create(cfg)


class Blip2Base(L.LightningModule):
    """Frozen image encoder -> ln_vision -> Q-Former, with the optimizer and checkpoint hooks."""

    def __init__(self, cfg):
        super().__init__()
        cfg = as_config(cfg)
        # The resolved config travels inside every checkpoint, so evaluate/export need nothing else.
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        # the frozen parts a checkpoint leaves out are rebuilt; on_load_checkpoint checks every other key
        self.strict_loading = False
        self.cache_dir = str(Path(cfg.cache_dir) / "tokenizers")
        # stage 2 keeps the query path (its weights come from stage 1), unless VQA gives the Q-Former the question
        query_only = cfg.stage.name == 2 and not question_to_qformer(cfg)
        self.encoder = build_image_encoder(cfg.encoder)  # first: its missing weights are the usual stop
        self.tokenizer = None if query_only else build_qformer_tokenizer(
            cfg.qformer.tokenizer or cfg.qformer.bert, self.cache_dir)
        # stage 2 with another bridge (conf/bridge) has no Q-Former: self.model is None there
        uses_qformer = not query_only or OmegaConf.select(cfg, "bridge.name", default="qformer") == "qformer"
        self.model = QFormer(cfg.qformer, vision_width=self.encoder.width,
                             vocab_size=len(self.tokenizer) if self.tokenizer else 0,
                             pad_token_id=self.tokenizer.pad_token_id if self.tokenizer else 0,
                             query_only=query_only) if uses_qformer else None
        if cfg.qformer.bert and not query_only:
            self.model.load_bert(cfg.qformer.bert)
        if cfg.trainer.compile and self.model is not None:  # in place: names stay; dynamic: text lengths vary
            self.model.qformer.compile(dynamic=True, mode=cfg.trainer.compile_mode)
        self.register_buffer("skipped_samples", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("seen_samples", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long), persistent=True)
        self._nonfinite_in_a_row = 0
        # samples each of data.sources contributed (empty without sources)
        self.source_names = [s.name for s in (cfg.data.get("sources") or [])]
        self.register_buffer("source_samples", torch.zeros(len(self.source_names), dtype=torch.long),
                             persistent=True)
        log.info("trainable parameters: %.2fM (of %.2fM)", num_parameters(self, True) / 1e6,
                 num_parameters(self) / 1e6)

    # --------------------------------------------------------------------------- bookkeeping
    def count_samples(self, batch: dict) -> None:
        """Running totals of good and skipped samples, as tensors (no host sync in the step)."""
        self.seen_samples += batch["image_id"].shape[0]
        if "num_skipped" in batch:
            self.skipped_samples += batch["num_skipped"].to(self.skipped_samples.device)
        if "source" in batch and self.source_names:
            source = batch["source"].to(self.source_samples.device)  # [B]
            self.source_samples += torch.nn.functional.one_hot(source, len(self.source_names)).sum(0)

    def data_counts(self) -> dict[str, float]:
        """Skipped samples and samples per source, summed over ranks (a collective: call on every rank)."""
        counts = torch.cat([self.skipped_samples[None], self.seen_samples[None], self.source_samples])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        values = counts.tolist()
        out = {"data/skipped_samples": float(values[0]), "data/seen_samples": float(values[1])}
        out.update({f"data/source_{name}_samples": float(v) for name, v in zip(self.source_names, values[2:])})
        return out

    def check_skipped_fraction(self) -> None:
        """Stop when bad samples pass ``data.max_skipped_fraction`` (checked at log steps only).

        The counts are summed over ranks, so every rank stops together instead of one waiting.
        """
        if self.global_step % max(1, self.cfg.trainer.log_every_n_steps) != 0:
            return
        counts = self.data_counts()
        for name, value in counts.items():
            self.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)
        skipped, seen = int(counts["data/skipped_samples"]), int(counts["data/seen_samples"])
        if seen and skipped / (seen + skipped) > self.cfg.data.max_skipped_fraction:
            raise RuntimeError(
                f"{skipped} of {seen + skipped} samples were unreadable, more than "
                f"data.max_skipped_fraction={self.cfg.data.max_skipped_fraction}: check the shards "
                f"(each skipped sample is logged with its shard and key)")

    def finite_or_skip(self, loss: torch.Tensor, batch: dict) -> torch.Tensor | None:
        """``loss``, or None when it is NaN/inf on any rank: Lightning then runs no backward, the
        gradients stay cleared and the optimizer updates nothing (the step still counts).

        This is the step's one host sync (a bool of one flag, all-reduced over ranks so that every
        rank skips together); ``trainer.max_nonfinite_steps`` in a row stop the run."""
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):
            self._nonfinite_in_a_row = 0
            self.log("train/nonfinite_steps", self.nonfinite_steps.float(), on_step=True, on_epoch=False)
            return loss
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", self.nonfinite_steps.float(), on_step=True, on_epoch=False)
        keys = list(batch.get("key", []))
        limit = self.cfg.trainer.max_nonfinite_steps
        log.warning("non-finite loss (%s) at step %d, %d in a row: update skipped; batch keys: %s",
                    loss.detach().float().cpu().item(), self.global_step, self._nonfinite_in_a_row,
                    keys or "(the batch carries no keys)")
        if self._nonfinite_in_a_row >= limit:
            raise RuntimeError(
                f"{self._nonfinite_in_a_row} non-finite losses in a row (trainer.max_nonfinite_steps={limit}), "
                f"the last at step {self.global_step} (batch keys: {keys[:8] or 'none'}). Lower optim.lr, set "
                f"trainer.gradient_clip_val, or check these samples; raise trainer.max_nonfinite_steps to "
                f"tolerate more")
        return None

    # ------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        return build_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)

    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step()

    # ------------------------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """trainer=fsdp: shard into FSDP2 units (blip2_train/training/fsdp.py); a no-op for other strategies."""
        from torch.distributed.fsdp import FSDPModule

        if self.device_mesh is None or isinstance(self.encoder, FSDPModule):  # not FSDP, or done already
            return
        from blip2_train.training.fsdp import shard_blip2

        self._fsdp_trainable_units = shard_blip2(self, self.device_mesh["data_parallel"])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.cfg.trainer.compile and self.cfg.trainer.compile_mode in CUDA_GRAPH_MODES:
            # tells CUDA graph trees a new iteration begins (Lightning's loop gives them no other sign), so
            # the memory of the last step's graph outputs may be reused; PyTorch's pattern for training loops
            torch.compiler.cudagraph_mark_step_begin()

    def on_after_backward(self) -> None:
        if getattr(self, "_fsdp_trainable_units", None):
            from blip2_train.training.fsdp import reshard_trainable

            reshard_trainable(self._fsdp_trainable_units)

    # ----------------------------------------------------------------------------- checkpoint
    def encoder_is_rebuildable(self) -> bool:
        """A frozen encoder with pretrained weights is rebuilt from them, so it is not saved."""
        return "encoder" in rebuildable_parts(self.cfg)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """One rule (``interop.state_dict.rebuildable_parts``): the frozen parts rebuilt from their own weights
        are left out of a single-file checkpoint, which records them and their sources under
        ``omitted_parts``. A sharded (FSDP) checkpoint keeps every weight (loading it back requires
        every key) and records them under ``rebuildable_parts``, for ``consolidate``."""
        parts = rebuildable_parts(self.cfg)
        if self.device_mesh is not None:
            checkpoint["omitted_parts"], checkpoint["rebuildable_parts"] = {}, parts
            return
        state = checkpoint["state_dict"]
        prefixes = tuple(part["prefix"] for part in parts.values())
        for key in [k for k in state if k.startswith(prefixes)] if prefixes else []:
            del state[key]
        checkpoint["omitted_parts"] = parts

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume: every weight but the omitted parts (already rebuilt from their sources when this
        module was built) must be in the checkpoint, and nothing else."""
        if "state_dict" not in checkpoint:  # a sharded checkpoint: loaded with every key by the strategy
            return
        omitted = omitted_parts_of(checkpoint)
        missing, unexpected = state_mismatch(self.state_dict().keys(), checkpoint["state_dict"].keys(), omitted)
        if missing or unexpected:
            raise ValueError(f"the checkpoint to resume from does not fit this model: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]} (left out and rebuilt: {sorted(omitted) or 'nothing'})")
        for name, part in omitted.items():
            now = rebuildable_parts(self.cfg).get(name, {}).get("source")
            if now != part["source"]:
                log.warning("resuming: the frozen %s was trained from %s and is rebuilt from %s now",
                            name, part["source"], now)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.train(mode)  # the frozen encoder's own train() keeps it in eval mode
        return self
