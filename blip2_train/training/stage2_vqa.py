"""Stage 2 for visual question answering (``stage.task=vqa``, docs/vqa.md).

The question reaches the model twice, as in the paper's VQA fine-tuning and InstructBLIP:
- the Q-Former (``vqa.qformer_text_input=true``): its tokens sit beside the 32 queries in one
  self-attention (queries and question see each other, the ITM mask), so the queries extract what
  the question asks for; only the query outputs go on to the LLM;
- the LLM, behind ``vqa.prompt`` ("Question: {} Short answer:"): decoder-only, the answer follows the
  prompt and only the answer (and its "\\n" end token) is a target; encoder-decoder, the prompt is
  the encoder's text and the answer the decoder's target.

``vqa.qformer_text_input=false`` keeps stage 2's query-only Q-Former: the question goes to the LLM
prompt alone. That is zero-shot VQA of a caption-trained stage-2 checkpoint (evaluate.py sets it
for checkpoints whose Q-Former never read text), and a fine-tuning choice for LAVIS-style models.
Validation generates short answers (``vqa.num_beams``, ``vqa.max_new_tokens``) and logs
``val/vqa_accuracy`` (VQAv2 accuracy, metrics/vqa.py) besides ``val/loss``.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from blip2_train.config import VQAConfig, question_to_qformer
from blip2_train.data.vqa import DecodeVQASamples, VQACollate, format_prompt
from blip2_train.models.qformer import itm_mask
from blip2_train.training.stage2 import Stage2Module
from blip2_train.training.tracking import NUM_SAMPLES

STAGE1_HEADS = ("vision_projection", "text_projection", "itm_head", "lm_head", "temp")


def vqa_settings(cfg):
    """``cfg.vqa`` over the defaults (checkpoints written before VQA existed carry no ``vqa``)."""
    return OmegaConf.merge(OmegaConf.structured(VQAConfig), cfg.get("vqa") or {})


class VQAModule(Stage2Module):
    """Stage 2 answering questions: question-aware queries -> projection -> frozen LLM -> answer."""

    sample_decoder = DecodeVQASamples  # the data module decodes question + answers, not captions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vqa = vqa_settings(self.cfg)
        self.question_to_qformer = question_to_qformer(self.cfg)
        if self.question_to_qformer:  # the text path is kept for the question; stage 1's heads have no use here
            for name in STAGE1_HEADS:  # (unused trainable parameters would also stall DDP)
                if hasattr(self.model, name):
                    delattr(self.model, name)

    def text_collates(self):
        qformer_tok = self.tokenizer if self.question_to_qformer else None
        args = (self.llm_tokenizer, self.decoder_only, self.vqa.prompt, self.cfg.llm.max_text_len, qformer_tok,
                self.vqa.max_question_len, self.cfg.seed)
        return VQACollate(*args), VQACollate(*args, deterministic=True)

    # ------------------------------------------------------------------------------- forward
    def question_prompts(self, images: torch.Tensor | None, input_ids: torch.Tensor | None,
                         attention_mask: torch.Tensor | None, vision_tokens: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Images [B, 3, H, W] + question tokens [B, T] -> projected query outputs [B, Q, D_llm]."""
        if not self.question_to_qformer:
            return self.visual_prompts(images, vision_tokens)
        if vision_tokens is None:
            vision_tokens = self.encoder(images)  # no_grad and detached when frozen
        model, num_queries = self.model, self.model.num_query_tokens
        states = model.image_states(vision_tokens)
        # queries and question tokens attend to each other; only the Q query outputs are kept
        hidden = model.joint_forward(states, input_ids, itm_mask(attention_mask, num_queries),
                                     model.cross_attention_kv(states), output_length=num_queries)  # [B, Q, H]
        return self.language_projection(hidden)

    def _batch_prompts(self, batch: dict) -> torch.Tensor:
        return self.question_prompts(batch.get("image"), batch.get("input_ids"), batch.get("attention_mask"),
                                     batch.get("vision_tokens"))

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], **overrides) -> list[str]:
        """Short answers to one question per image (``vqa.*`` generation settings, ``overrides`` win)."""
        gen = {"num_beams": self.vqa.num_beams, "max_new_tokens": self.vqa.max_new_tokens,
               "min_new_tokens": self.vqa.min_new_tokens, "length_penalty": self.vqa.length_penalty, **overrides}
        ids = mask = None
        if self.question_to_qformer:
            enc = self.tokenizer(list(questions), padding="longest", truncation=True,
                                 max_length=self.vqa.max_question_len, return_tensors="pt").to(images.device)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        visual = self.question_prompts(images, ids, mask)
        texts = [format_prompt(self.vqa.prompt, q) for q in questions]
        return self.generate_from_visual(visual, texts, gen)

    # ----------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"loss": [], "count": [], "answers": {}, "preds": {}, "samples": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        size = batch["image"].shape[0]
        self._val["loss"].append(self.lm_loss(self._batch_prompts(batch), batch).detach() * size)
        self._val["count"].append(size)
        if self.vqa.num_beams <= 0:
            return
        answers = self.answer(batch["image"], batch["question"])
        for i, (key, predicted) in enumerate(zip(batch["key"], answers)):
            self._val["preds"][key] = predicted
            self._val["answers"][key] = batch["answers"][i]
            if len(self._val["samples"]) < NUM_SAMPLES:  # the validation table (tracking.py)
                self._val["samples"].append({"image": batch["image"][i].cpu(), "key": key,
                                             "question": batch["question"][i], "generated_caption": predicted,
                                             "reference": batch["target_answer"][i]})

    def on_validation_epoch_end(self) -> None:
        from blip2_train.metrics.vqa import vqa_score

        if not self._val.get("count"):
            return
        loss = torch.stack(self._val["loss"]).sum() / sum(self._val["count"])
        self.log("val/loss", loss, sync_dist=False)
        if self._val["preds"]:
            self.log("val/vqa_accuracy", vqa_score(self._val["preds"], self._val["answers"]))
            self.predictions = dict(self._val["preds"])
            self.val_samples = list(self._val["samples"])
