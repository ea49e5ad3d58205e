"""Stage 2: a bridge's outputs as soft visual prompts of a frozen LLM (docs/blip2_numerics.md s.3, s.8).

The bridge (``bridge`` group, models/bridges.py): the Q-Former's projected query outputs (BLIP-2), an MLP
over every patch token (LLaVA-1.5) or over the average-pooled patch grid (DeCo).

Decoder-only (OPT): [visual prompts; BOS + prompt + caption + "\\n"], plain causal LM loss on the
caption and its "\\n". Encoder-decoder (FlanT5): prefix LM, encoder [visual prompts; prefix],
decoder target = suffix.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from omegaconf import OmegaConf
from torch import nn

from blip2_train.models.bridges import QFormerBridge, build_mlp_bridge
from blip2_train.models.llm import build_llm
from blip2_train.models.objectives import Stage2Objective
from blip2_train.models.qformer import num_parameters
from blip2_train.training.base import Blip2Base
from blip2_train.training.tiny_llm import pretrain_from_config
from blip2_train.training.tracking import NUM_SAMPLES

log = logging.getLogger(__name__)


class Stage2Module(Blip2Base):
    """Frozen encoder -> bridge (Q-Former + language_projection, or an MLP) -> frozen LLM."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.llm, self.llm_tokenizer = build_llm(cfg.llm, self.cache_dir, pretrain=pretrain_from_config)
        self.decoder_only = cfg.llm.kind == "decoder"
        self.objective = Stage2Objective(self.decoder_only)  # no parameters of its own
        llm_width = self.llm.model.get_input_embeddings().embedding_dim
        self.bridge_name = OmegaConf.select(cfg, "bridge.name", default="qformer")  # older checkpoints: qformer
        if self.bridge_name == "qformer":
            self.language_projection = nn.Linear(cfg.qformer.hidden_size, llm_width)
            # its parts stay registered as model.* / language_projection.* (BLIP-2's names, stage-1 init,
            # the transformers and LAVIS maps); the bridge is a view over them, not a second registration
            self.__dict__["bridge"] = QFormerBridge(self.model, self.language_projection)
        else:
            self.bridge = build_mlp_bridge(self.bridge_name, self.encoder.width, llm_width, self.encoder.num_tokens,
                                           cfg.bridge.num_tokens, cfg.bridge.hidden_size, cfg.bridge.keep_cls)
        self.visual_tokens = self.bridge.num_tokens  # per image: logged as bridge/visual_tokens
        self.trainable_params = num_parameters(self, True)  # logged as bridge/trainable_params
        log.info("bridge=%s: %d visual tokens per image, %.3fM trainable parameters", self.bridge_name,
                 self.visual_tokens, self.trainable_params / 1e6)
        if self.decoder_only:  # "\n" ends a caption (LAVIS)
            self.end_token_id = self.llm_tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
        else:
            self.end_token_id = self.llm_tokenizer.eos_token_id
        self.predictions: dict[str, str] = {}
        self.val_samples: list[dict] = []  # written by tracking.ValidationSamples
        self._val: dict = {}

    def text_collates(self):
        from blip2_train.data.llm_text import DecoderOnlyCollate, PrefixLMCollate

        tok, max_len = self.llm_tokenizer, self.cfg.llm.max_text_len
        if self.decoder_only:
            collate = DecoderOnlyCollate(tok, self.cfg.llm.prompt, max_len,
                                         OmegaConf.select(self.cfg, "llm.prompt_mask", default="joined"))
            return collate, collate
        return (PrefixLMCollate(tok, max_len, seed=self.cfg.seed),
                PrefixLMCollate(tok, max_len, seed=self.cfg.seed, deterministic=True))

    # ------------------------------------------------------------------------------- forward
    def visual_prompts(self, images: torch.Tensor | None, vision_tokens: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """[B, 3, H, W] (or cached encoder tokens [B, N, W]) -> the bridge's prompts [B, M, D_llm]."""
        if vision_tokens is None:
            vision_tokens = self.encoder(images)  # no_grad and detached when frozen
        return self.bridge(vision_tokens)

    def lm_loss(self, prompts: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean CE over target tokens (``models.objectives.Stage2Objective``); prompts are never targets."""
        return self.objective.lm_loss(self.llm, prompts, batch)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: list[str] | str | None = None, **overrides) -> list[str]:
        """Captions (or answers) for a batch of images; ``generation.*`` settings, new tokens only."""
        gen = {**dict(self.cfg.generation), **overrides}
        batch = images.shape[0]
        text = gen["prompt"] if prompts is None else prompts
        texts = [text] * batch if isinstance(text, str) else list(text)
        return self.generate_from_visual(self.visual_prompts(images), texts, gen)

    @torch.no_grad()
    def generate_from_visual(self, visual: torch.Tensor, texts: list[str], gen: dict) -> list[str]:
        """Visual prompts [B, Q, D] + one text per row -> the generated continuations (new tokens only)."""
        llm, tok = self.llm, self.llm_tokenizer
        tok.padding_side = "left" if self.decoder_only else "right"  # T5's encoder pads on the right
        enc = tok(texts, padding="longest", return_tensors="pt").to(visual.device)
        text = llm.embed(enc["input_ids"])
        inputs = torch.cat([visual.to(text.dtype), text], dim=1)
        mask = torch.cat([torch.ones(visual.shape[:2], dtype=enc["attention_mask"].dtype, device=visual.device),
                          enc["attention_mask"]], dim=1)
        if self.decoder_only:  # true left padding: move the pads in front of the visual prompts
            order = torch.argsort(mask, dim=1, stable=True)
            inputs = inputs.gather(1, order[..., None].expand_as(inputs))
            mask = mask.gather(1, order)
        out = llm.generate(inputs_embeds=inputs, attention_mask=mask, num_beams=gen["num_beams"],
                           max_new_tokens=gen["max_new_tokens"], min_new_tokens=gen["min_new_tokens"],
                           length_penalty=gen["length_penalty"], eos_token_id=self.end_token_id,
                           pad_token_id=tok.pad_token_id, do_sample=False,
                           synced_gpus=self.device_mesh is not None)  # FSDP: every rank steps together
        tok.padding_side = "right"
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    # ---------------------------------------------------------------------------------- train
    def _batch_prompts(self, batch: dict) -> torch.Tensor:
        """The visual prompts of a training batch (VQAModule adds the question)."""
        return self.visual_prompts(batch.get("image"), batch.get("vision_tokens"))

    def training_step(self, batch: dict, batch_idx: int):
        self.count_samples(batch)
        loss = self.lm_loss(self._batch_prompts(batch), batch)
        size = batch["image_id"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        self.check_skipped_fraction()
        return self.finite_or_skip(loss, batch)

    # ----------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"loss": [], "count": [], "refs": defaultdict(list), "preds": {}, "keys": {}, "samples": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prompts = self.visual_prompts(batch["image"])
        size = batch["image"].shape[0]
        self._val["loss"].append(self.lm_loss(prompts, batch).detach() * size)
        self._val["count"].append(size)
        image_ids = batch["image_id"].tolist()
        for image_id, caption in zip(image_ids, batch["caption"]):
            self._val["refs"][image_id].append(caption)
        if self.cfg.generation.num_beams > 0:
            first = {}
            for i, image_id in enumerate(image_ids):
                if image_id not in self._val["preds"] and image_id not in first:
                    first[image_id] = i
            if first:
                rows = torch.tensor(list(first.values()), device=batch["image"].device)
                captions = self.generate(batch["image"][rows])
                for (image_id, i), caption in zip(first.items(), captions):
                    self._val["preds"][image_id] = caption
                    self._val["keys"][image_id] = batch["key"][i]
                    if len(self._val["samples"]) < NUM_SAMPLES:  # the validation table (tracking.py)
                        self._val["samples"].append({"image": batch["image"][i].cpu(), "key": batch["key"][i],
                                                     "image_id": image_id, "generated_caption": caption})

    def on_validation_epoch_end(self) -> None:
        from blip2_train.metrics.captioning import caption_metrics

        if not self._val.get("count"):
            return
        loss = torch.stack(self._val["loss"]).sum() / sum(self._val["count"])
        self.log("val/loss", loss, sync_dist=False)
        # what the bridge costs, beside what it buys (the ablation's report reads these from metrics.json)
        self.log("bridge/visual_tokens", float(self.visual_tokens))
        self.log("bridge/trainable_params", float(self.trainable_params))
        if self._val["preds"]:
            scores = caption_metrics(self._val["preds"], self._val["refs"])
            self.log("cider", scores["cider"])
            self.log("bleu4", scores["bleu4"])
            if OmegaConf.select(self.cfg, "data.synthetic.kind", default="shapes") == "scenes":
                from blip2_train.metrics.scenes import scene_metrics

                for name, value in scene_metrics(self._val["preds"], self._val["refs"]).items():
                    self.log(f"val/{name}", value)
            self.predictions = {self._val["keys"][i]: c for i, c in self._val["preds"].items()}
            self.val_samples = [{**row, "reference": self._val["refs"][row.pop("image_id")][0]}
                                for row in self._val["samples"]]
