"""The stage objectives as modules: what one batch costs, given the parts of the model.

- :class:`Stage1Objective`: ITC + ITM (hard negatives) + ITG of the Q-Former (docs/blip2_numerics.md s.2);
- :class:`Stage2Objective`: the bridge's soft visual prompts before the frozen LLM's text, and the LM
  loss on the target tokens (docs/blip2_numerics.md s.3).

They hold no parameters or buffers of their own: the Q-Former, bridge and LLM are passed to each call.
The LightningModules of training/ keep those parts registered under BLIP-2's names (``model.*``,
``language_projection.*``, ``llm.*``), so checkpoints, ``init_from`` and the transformers / LAVIS name
maps do not change; the benchmark (bench/harness.py) calls these modules on bare parts, no Lightning.
"""

from __future__ import annotations

import torch
from torch import nn

from blip2_train.losses import (
    gather_no_grad,
    gather_with_grad,
    hard_negative_indices,
    itc_loss,
    itc_similarities,
    itg_loss,
    itm_loss,
    positive_mask,
)
from blip2_train.models.qformer import itg_mask


class Stage1Objective(nn.Module):
    """ITC + ITM + ITG of one batch; features are gathered over ranks for ITC and ITM.

    ``dec_token_id``: the [DEC] token that replaces [CLS] for ITG; the weights and label smoothing are
    ``stage.*`` of the config."""

    def __init__(self, dec_token_id: int, label_smoothing: float = 0.0, itc_weight: float = 1.0,
                 itm_weight: float = 1.0, itg_weight: float = 1.0):
        super().__init__()
        self.dec_token_id = dec_token_id
        self.label_smoothing = label_smoothing
        self.itc_weight, self.itm_weight, self.itg_weight = itc_weight, itm_weight, itg_weight

    @classmethod
    def from_stage(cls, stage, dec_token_id: int) -> Stage1Objective:
        """From a ``stage`` config node (anything with its attributes)."""
        return cls(dec_token_id, stage.label_smoothing, stage.itc_weight, stage.itm_weight, stage.itg_weight)

    def forward(self, model: nn.Module, vision_tokens: torch.Tensor, input_ids: torch.Tensor,
                text_mask: torch.Tensor, image_ids: torch.Tensor, generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
        """``model``: a ``QFormer``; ``vision_tokens`` [B, N, W] (the frozen encoder's output or the feature
        cache's); text ids / mask [B, T] ([CLS] first, equal lengths on every rank); ``image_ids`` [B].
        ``generator`` draws the ITM hard negatives (None: the global RNG)."""
        num_queries = model.num_query_tokens
        batch_size = input_ids.shape[0]
        # [B, N, W] fp32: ln_vision(tokens), or under qformer.impl=fast the normalised tokens whose
        # ln_vision affine is folded into the K/V projections (QFormer.image_states)
        image_embeds = model.image_states(vision_tokens)
        # cross-attention K/V of the local images, once for every pass (None under qformer.impl=hf)
        cross_kv = model.cross_attention_kv(image_embeds)

        # One pass [queries; [DEC] text] under the ITG mask: its query outputs are the
        # query-only pass (queries never see text), so ITC's image side comes from it too.
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        hidden = model.joint_forward(image_embeds, dec_ids, itg_mask(text_mask, num_queries), cross_kv)
        image_feats = model.image_features(hidden[:, :num_queries])  # [B, Q, D]
        text_feats = model.text_features(model.text_forward(input_ids, text_mask, output_length=1))  # [B, D]

        # ---- ITC over the global batch
        image_feats_all = gather_with_grad(image_feats)  # [N, Q, D]
        text_feats_all = gather_with_grad(text_feats)  # [N, D]
        image_ids_all = gather_no_grad(image_ids)  # [N]
        sim_i2t, sim_t2i = itc_similarities(image_feats, text_feats_all, text_feats, image_feats_all)
        positives = positive_mask(image_ids, image_ids_all)  # [B, N]
        temperature = model.current_temperature(text_feats)
        loss_itc = itc_loss(sim_i2t, sim_t2i, temperature, positives, self.label_smoothing)

        # ---- ITM with hard negatives sampled over the global batch
        image_embeds_all = gather_with_grad(image_embeds)  # [N, Nv, W]
        input_ids_all, text_mask_all = gather_no_grad(input_ids), gather_no_grad(text_mask)
        with torch.no_grad():
            scale = temperature.detach()
            neg_image, valid_image = hard_negative_indices(sim_t2i.detach() / scale, positives, generator)
            neg_text, valid_text = hard_negative_indices(sim_i2t.detach() / scale, positives, generator)
        itm_ids = torch.cat([input_ids, input_ids, input_ids_all[neg_text]])
        itm_text_mask = torch.cat([text_mask, text_mask, text_mask_all[neg_text]])
        # ITM images [local; negatives; local] as chunks over cached K/V (issue 7): one process
        # gathers the B negatives' K/V rows; several compute K/V of the B gathered negatives once.
        # Chunks reading the same K/V rows share them without copies (FastQFormerModel).
        local = torch.arange(batch_size, device=input_ids.device)
        if image_embeds_all is image_embeds:  # one process: gather_with_grad returned the input
            itm_images, itm_kv = image_embeds, cross_kv
            itm_index = [0, neg_image, 0] if cross_kv is not None else torch.cat([local, neg_image, local])
        else:
            itm_images = torch.cat([image_embeds, image_embeds_all[neg_image]])  # [2B, Nv, W]
            neg_kv = model.cross_attention_kv(itm_images[batch_size:])
            itm_kv = None if cross_kv is None else [
                (torch.cat([k, nk]), torch.cat([v, nv])) for (k, v), (nk, nv) in zip(cross_kv, neg_kv)]
            itm_index = ([0, batch_size, 0] if cross_kv is not None
                         else torch.cat([local, local + batch_size, local]))  # [3B]
        itm_logits = model.itm_logits(itm_images, itm_ids, itm_text_mask, itm_kv, itm_index)  # [3B, 2]
        weights = torch.cat([torch.ones_like(valid_image, dtype=torch.float),
                             valid_image.float(), valid_text.float()])
        loss_itm = itm_loss(itm_logits, batch_size, weights)

        # ---- ITG: the text positions of the joint pass
        lm_logits = model.lm_logits(hidden[:, num_queries:-1])  # [B, T - 1, V]: the last predicts nothing
        loss_itg = itg_loss(lm_logits, dec_ids, text_mask, self.label_smoothing)

        loss = self.itc_weight * loss_itc + self.itm_weight * loss_itm + self.itg_weight * loss_itg
        return {"loss": loss, "itc": loss_itc, "itm": loss_itm, "itg": loss_itg}


class Stage2Objective(nn.Module):
    """The LM loss of a frozen LLM behind soft visual prompts (mean CE over the target tokens).

    Decoder-only (OPT): [prompts; text], the prompts labelled -100 (never targets). Encoder-decoder
    (FlanT5): the encoder reads [prompts; prefix], the decoder's targets are ``llm_labels``."""

    def __init__(self, decoder_only: bool):
        super().__init__()
        self.decoder_only = decoder_only

    def forward(self, bridge: nn.Module, llm: nn.Module, vision_tokens: torch.Tensor,
                batch: dict) -> torch.Tensor:
        """``bridge``: vision tokens [B, N, W] -> prompts [B, M, D_llm] (models/bridges.py); ``llm``: a
        ``FrozenLLM``; ``batch``: ``llm_input_ids``, ``llm_attention_mask``, ``llm_labels`` [B, T] (and
        ``llm_decoder_attention_mask`` for an encoder-decoder)."""
        return self.lm_loss(llm, bridge(vision_tokens), batch)

    def lm_loss(self, llm: nn.Module, prompts: torch.Tensor, batch: dict) -> torch.Tensor:
        """The loss of ``prompts`` [B, M, D_llm] already made (a VQA module's question-aware queries)."""
        ids, mask, labels = batch["llm_input_ids"], batch["llm_attention_mask"], batch["llm_labels"]
        text = llm.embed(ids)  # [B, T, D]
        prompts = prompts.to(text.dtype)
        visual_mask = torch.ones(prompts.shape[:2], dtype=mask.dtype, device=mask.device)
        inputs = torch.cat([prompts, text], dim=1)  # [B, M + T, D]
        attention = torch.cat([visual_mask, mask], dim=1)
        if self.decoder_only:
            ignore = torch.full(prompts.shape[:2], -100, dtype=labels.dtype, device=labels.device)
            out = llm(inputs_embeds=inputs, attention_mask=attention, labels=torch.cat([ignore, labels], 1))
        else:
            out = llm(inputs_embeds=inputs, attention_mask=attention, labels=labels,
                      decoder_attention_mask=batch["llm_decoder_attention_mask"])
        return out.loss
