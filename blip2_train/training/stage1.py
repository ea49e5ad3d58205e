"""Stage 1: image-text contrastive, matching and generation losses (docs/blip2_numerics.md section 2).

The losses are ``models.objectives.Stage1Objective``; this LightningModule feeds it, logs, validates
(retrieval) and checkpoints."""

from __future__ import annotations

import torch

from blip2_train.models.objectives import Stage1Objective
from blip2_train.retrieval import group_by_image, retrieval_metrics
from blip2_train.training.base import Blip2Base
from blip2_train.training.tracking import NUM_SAMPLES


class Stage1Module(Blip2Base):
    """Encoder (frozen) + Q-Former trained with ITC + ITM + ITG."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dec_token_id = self.tokenizer.convert_tokens_to_ids("[DEC]")
        # the losses; no parameters of its own (the Q-Former stays self.model)
        self.objective = Stage1Objective.from_stage(self.cfg.stage, self.dec_token_id)
        self._val_outputs: list[dict] = []
        self._val_images = torch.zeros(0)
        self.val_samples: list[dict] = []  # written by tracking.ValidationSamples
        self.itm_generator: torch.Generator | None = None  # set by tests for reproducible sampling

    def text_collates(self):
        """Tokenisation for the loaders: 32 tokens for training, 35 for retrieval evaluation."""
        from blip2_train.data.text import QFormerTextCollate

        return (QFormerTextCollate(self.tokenizer, self.cfg.stage.max_text_len),
                QFormerTextCollate(self.tokenizer, self.cfg.stage.max_eval_text_len))

    # ---------------------------------------------------------------------------------- train
    def _pad_for_gather(self, input_ids, attention_mask):
        """Equal text lengths on every rank, so token ids can be gathered for ITM negatives."""
        if self.trainer is None or self.trainer.world_size == 1:
            return input_ids, attention_mask
        pad = self.cfg.stage.max_text_len - input_ids.shape[1]
        if pad > 0:
            input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=self.tokenizer.pad_token_id)
            attention_mask = torch.nn.functional.pad(attention_mask, (0, pad), value=0)
        return input_ids, attention_mask

    def stage1_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The three losses of one batch (``models.objectives.Stage1Objective``), texts padded to equal
        lengths across ranks; image tokens from the frozen encoder or ``batch["vision_tokens"]``."""
        input_ids, text_mask = self._pad_for_gather(batch["input_ids"], batch["attention_mask"])
        vision_tokens = batch.get("vision_tokens")  # [B, N, W] from data.feature_cache
        if vision_tokens is None:
            vision_tokens = self.encoder(batch["image"])  # [B, N, W]; no_grad and detached when frozen
        return self.objective(self.model, vision_tokens, input_ids, text_mask, batch["image_id"],
                              self.itm_generator)

    def training_step(self, batch: dict, batch_idx: int):
        self.count_samples(batch)
        losses = self.stage1_losses(batch)
        batch_size = batch["image_id"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        self.log("train/temp", self.model.current_temperature(losses["loss"]).detach(), batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        self.check_skipped_fraction()
        return self.finite_or_skip(losses["loss"], batch)

    # ----------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image_embeds = self.model.encode_image(self.encoder(batch["image"]))
        image_feats = self.model.image_features(self.model.query_forward(image_embeds))
        text_feats = self.model.text_features(self.model.text_forward(batch["input_ids"],
                                                                      batch["attention_mask"], output_length=1))
        self._val_outputs.append({
            "image_embeds": image_embeds.cpu(), "image_feats": image_feats.cpu(),
            "text_feats": text_feats.cpu(), "input_ids": batch["input_ids"].cpu(),
            "attention_mask": batch["attention_mask"].cpu(), "image_id": batch["image_id"].cpu(),
            "caption": list(batch.get("caption", [])), "key": list(batch.get("key", [])),
        })
        if batch_idx == 0:  # the images of the validation table (tracking.py)
            self._val_images = batch["image"][:NUM_SAMPLES].cpu()

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        metrics = self.compute_retrieval(self._val_outputs)
        self.val_samples = self.top_captions(self._val_outputs, self._val_images)
        self._val_outputs = []
        for name, value in metrics.items():
            self.log(name, value, sync_dist=False, rank_zero_only=False)

    @staticmethod
    def top_captions(outputs: list[dict], images: torch.Tensor) -> list[dict]:
        """The first validation images with the caption ITC ranks first among all val captions."""
        captions = [c for o in outputs for c in o["caption"]]
        keys = [k for o in outputs for k in o["key"]]
        if not captions or not keys:
            return []
        text_feats = torch.cat([o["text_feats"] for o in outputs])  # [Nt, D]
        image_feats = outputs[0]["image_feats"][: images.shape[0]]  # [n, Q, D]
        best = torch.einsum("iqd,td->itq", image_feats.float(), text_feats.float()).amax(-1).argmax(1)
        return [{"image": images[i], "key": keys[i], "caption": captions[i],
                 "top_retrieved_caption": captions[j]} for i, j in enumerate(best.tolist())]

    @torch.no_grad()
    def compute_retrieval(self, outputs: list[dict]) -> dict[str, float]:
        """ITC ranking of every pair, then ITM re-ranking of the top ``retrieval.k_test``."""
        max_len = max(o["input_ids"].shape[1] for o in outputs)
        pad_id = self.tokenizer.pad_token_id

        def padded(key, value):
            return torch.cat([torch.nn.functional.pad(o[key], (0, max_len - o[key].shape[1]), value=value)
                              for o in outputs])

        input_ids, text_mask = padded("input_ids", pad_id), padded("attention_mask", 0)
        text_feats = torch.cat([o["text_feats"] for o in outputs])
        text_image_ids = torch.cat([o["image_id"] for o in outputs])
        # one row per image: samples that share an image_id show the same image
        first, relevant = group_by_image(text_image_ids)  # [Ni], [Ni, Nt]
        image_feats = torch.cat([o["image_feats"] for o in outputs])[first]
        image_embeds = torch.cat([o["image_embeds"] for o in outputs])[first]
        sim_i2t = torch.einsum("iqd,td->itq", image_feats.float(), text_feats.float()).amax(-1)

        device, chunk = self.device, self.cfg.data.eval_batch_size

        def pair_scores(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
            scores = []
            for start in range(0, image_index.numel(), chunk):
                i, t = image_index[start:start + chunk], text_index[start:start + chunk]
                logits = self.model.itm_logits(image_embeds[i].to(device), input_ids[t].to(device),
                                               text_mask[t].to(device))
                scores.append(logits[:, 1].float().cpu())
            return torch.cat(scores)

        return retrieval_metrics(sim_i2t, relevant, self.cfg.retrieval.k_test, pair_scores)

