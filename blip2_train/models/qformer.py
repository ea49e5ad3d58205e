"""The Q-Former: transformers' ``Blip2QFormerModel`` plus the BLIP-2 stage-1 heads.

Parameter names follow transformers' ``Blip2ForImageTextRetrieval`` (``query_tokens``,
``embeddings``, ``qformer``, ``vision_projection``, ``text_projection``, ``itm_head``) so that
export/import is a rename of ``ln_vision`` and ``lm_head`` only.

Three kinds of pass (docs/blip2_numerics.md section 2):
- ``text_forward``: text alone, bidirectional (ITC text features).
- ``joint_forward`` with :func:`itg_mask`: queries see queries, text sees all queries and earlier
  text. Its query outputs equal a query-only pass, so one pass serves ITC (image side) and ITG.
- ``joint_forward`` with :func:`itm_mask`: queries and text see each other (ITM).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

from blip2_train.models.fast_qformer import CrossKV, FastQFormerModel

log = logging.getLogger(__name__)


class LMHead(nn.Module):
    """BERT's MLM prediction head; ``decoder.weight`` is tied to the word embeddings."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(hidden_size, hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.transform.LayerNorm(F.gelu(self.transform.dense(hidden)))
        return F.linear(hidden, self.decoder.weight, self.bias)  # the bias added inside the product


def itg_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean [B, 1, Q+T, Q+T] mask (True = may attend) for image-grounded generation."""
    batch, length = text_mask.shape
    total = num_queries + length
    device = text_mask.device
    mask = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
    mask[:, :, :num_queries] = True  # everyone sees the queries
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask[:, num_queries:, num_queries:] = causal & text_mask.bool()[:, None, :]
    return mask[:, None]


def itm_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean [B, 1, 1, Q+T] key mask: queries and valid text tokens see each other."""
    query_part = torch.ones(text_mask.shape[0], num_queries, dtype=torch.bool, device=text_mask.device)
    return torch.cat([query_part, text_mask.bool()], dim=1)[:, None, None, :]


class QFormer(nn.Module):
    """Query tokens + ``ln_vision`` + Q-Former + ITC/ITM/LM heads + temperature."""

    def __init__(self, cfg, vision_width: int, vocab_size: int, pad_token_id: int = 0,
                 query_only: bool = False):
        """``query_only`` (stage 2) builds the query path alone: no text embeddings, text FFNs or heads."""
        super().__init__()
        self.config = Blip2QFormerConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            hidden_dropout_prob=cfg.hidden_dropout_prob,
            attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
            max_position_embeddings=cfg.max_position_embeddings,
            initializer_range=cfg.initializer_range,
            layer_norm_eps=cfg.layer_norm_eps,
            pad_token_id=None if query_only else pad_token_id,
            cross_attention_frequency=cfg.cross_attention_frequency,
            encoder_hidden_size=vision_width,
            use_qformer_text_input=not query_only,
        )
        self.config._attn_implementation = "sdpa"
        self.num_query_tokens = cfg.num_query_tokens
        self.temp_clamp = tuple(cfg.temp_clamp) if cfg.temp_clamp else None
        width = cfg.hidden_size

        self.ln_vision = nn.LayerNorm(vision_width)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, width))
        self.query_only = query_only
        if not query_only:  # built before the Q-Former: the order fixes seeded initialisation
            self.embeddings = Blip2TextEmbeddings(self.config)
        # qformer.impl (issue 7): fast = our module, same state dict, cached cross-attention K/V
        impl = getattr(cfg, "impl", "fast")
        if impl not in ("fast", "hf"):
            raise ValueError(f"qformer.impl={impl!r} is not valid; choose fast or hf")
        masks = getattr(cfg, "dropout_masks", "packed")
        self.qformer = (FastQFormerModel(self.config, dropout_masks=masks) if impl == "fast"
                        else Blip2QFormerModel(self.config))
        if not query_only:
            self.vision_projection = nn.Linear(width, cfg.embed_dim)
            self.text_projection = nn.Linear(width, cfg.embed_dim)
            self.itm_head = nn.Linear(width, 2)
            self.lm_head = LMHead(width, vocab_size, cfg.layer_norm_eps)
            # shape [1], not a scalar: FSDP2 cannot shard 0-d parameters (LAVIS's temp is 0-d)
            self.temp = nn.Parameter(torch.full((1,), float(cfg.temp_init)))
            self._init_weights(cfg.initializer_range)
            self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as in BERT
        else:
            nn.init.normal_(self.query_tokens, std=cfg.initializer_range)
        if cfg.gradient_checkpointing:
            self.qformer.gradient_checkpointing_enable()

    def _init_weights(self, std: float) -> None:
        for module in [self.embeddings, self.vision_projection, self.text_projection, self.itm_head,
                       self.lm_head.transform]:
            for sub in module.modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(sub.weight, std=std)
                    if getattr(sub, "bias", None) is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)
        nn.init.normal_(self.query_tokens, std=std)

    # ----------------------------------------------------------------------------------- passes
    @property
    def temperature(self) -> torch.Tensor:
        temp = self.temp.squeeze(0)
        return temp if self.temp_clamp is None else temp.clamp(*self.temp_clamp)

    def current_temperature(self, step_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The (optionally clamped) temperature, as a method so FSDP can unshard around it.

        ``step_tensor``: any tensor of the step, unused. FSDP2 before torch 2.14 fails on CUDA when a
        forward method is called without arguments (IndexError in ``_root_pre_forward``; seen on 2.11)."""
        return self.temperature

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """LM head over text positions: [B, T, H] -> [B, T, V]."""
        return self.lm_head(text_hidden)

    def encode_image(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """ln_vision in fp32 over the frozen encoder's tokens: [B, N, W] -> [B, N, W] fp32."""
        return self.ln_vision(vision_tokens.float())

    # ---- cross-attention K/V reuse (issue 7). ``image_index`` [B] picks each row's image from
    # ``image_embeds`` (or from ``cross_kv``'s batch); under impl=hf K/V are simply recomputed.
    @property
    def caches_kv(self) -> bool:
        """True under qformer.impl=fast: passes read images through :meth:`cross_attention_kv`."""
        return isinstance(self.qformer, FastQFormerModel)

    def image_states(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """What the training passes read of the images: [B, N, W] fp32.

        Under impl=hf, ``encode_image`` (ln_vision). Under impl=fast, the tokens normalised
        *without* ln_vision's affine: :meth:`cross_attention_kv` folds gamma and beta into the K/V
        projections, so no gradient of the [B, N, W] tokens is needed when the encoder is frozen
        (``folded_linear``). These states are then only for ``cross_attention_kv``; a pass given
        them must also be given their ``cross_kv``.
        """
        if not self.caches_kv:
            return self.encode_image(vision_tokens)
        return F.layer_norm(vision_tokens.float(), self.ln_vision.normalized_shape, eps=self.ln_vision.eps)

    def cross_attention_kv(self, image_states: torch.Tensor) -> CrossKV | None:
        """Per cross-attention layer (K, V) [B, heads, N, d] of :meth:`image_states`; None under impl=hf."""
        if self.caches_kv:
            return self.qformer.cross_attention_kv(image_states, (self.ln_vision.weight, self.ln_vision.bias))
        return None

    def _encode(self, embeds, query_length, mask=None, image_embeds=None, cross_kv=None, image_index=None,
                output_length=None):
        """``output_length``: only the first n positions are wanted ([B, n, H]); the fast module
        then skips the others' last-layer outputs."""
        if isinstance(self.qformer, FastQFormerModel):
            return self.qformer(embeds, query_length, mask, image_embeds, cross_kv=cross_kv,
                                image_index=image_index, output_length=output_length).last_hidden_state
        if image_index is not None:
            image_embeds = image_embeds[image_index]
        hidden = self.qformer(query_embeds=embeds, query_length=query_length, attention_mask=mask,
                              encoder_hidden_states=image_embeds).last_hidden_state
        return hidden if output_length is None else hidden[:, :output_length]
    # ---- end of K/V reuse

    def query_forward(self, image_embeds: torch.Tensor, cross_kv: CrossKV | None = None) -> torch.Tensor:
        """Queries alone over the image: [B, Q, H] (what stage 2 and retrieval use)."""
        batch = image_embeds.shape[0] if cross_kv is None else cross_kv[0][0].shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        return self._encode(queries, queries.shape[1], image_embeds=image_embeds, cross_kv=cross_kv)

    def text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     output_length: int | None = None) -> torch.Tensor:
        """Text alone, bidirectional over its valid tokens: [B, T, H] (``output_length=1``: the
        [CLS] output alone, [B, 1, H], what ITC reads)."""
        embeds = self.embeddings(input_ids=input_ids)
        return self._encode(embeds, 0, attention_mask.bool()[:, None, None, :], output_length=output_length)

    def joint_forward(self, image_embeds: torch.Tensor | None, input_ids: torch.Tensor, mask: torch.Tensor,
                      cross_kv: CrossKV | None = None, image_index: torch.Tensor | list | None = None,
                      output_length: int | None = None) -> torch.Tensor:
        """[queries; text] under a prepared boolean 4-D mask: [B, Q+T, H] (or the first
        ``output_length`` positions)."""
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        return self._encode(embeds, queries.shape[1], mask, image_embeds, cross_kv, image_index, output_length)

    def image_features(self, query_output: torch.Tensor) -> torch.Tensor:
        """[B, Q, H] -> L2-normalised [B, Q, D]."""
        return F.normalize(self.vision_projection(query_output), dim=-1)

    def text_features(self, text_output: torch.Tensor) -> torch.Tensor:
        """[CLS] output [B, T, H] -> L2-normalised [B, D]."""
        return F.normalize(self.text_projection(text_output[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cross_kv: CrossKV | None = None, image_index: torch.Tensor | list | None = None) -> torch.Tensor:
        """ITM logits averaged over the query outputs: [B, 2]."""
        hidden = self.joint_forward(image_embeds, input_ids, itm_mask(attention_mask, self.num_query_tokens),
                                    cross_kv, image_index, output_length=self.num_query_tokens)
        return self.itm_head(hidden).mean(dim=1)

    # ------------------------------------------------------------------------------ BERT init
    def load_bert(self, bert_name_or_path: str) -> dict:
        """Initialise embeddings, self-attention, both FFNs and the LM head from a BERT checkpoint.

        The query FFNs start as copies of BERT's FFN; cross-attention stays freshly initialised.
        Returns a report with the copied and untouched parameter names.
        """
        from transformers import BertForMaskedLM

        try:
            from blip2_train.utils.hub import local_only

            bert = BertForMaskedLM.from_pretrained(bert_name_or_path,
                                                   local_files_only=local_only(bert_name_or_path))
        except OSError as err:
            raise RuntimeError(
                f"Could not load the BERT checkpoint {bert_name_or_path!r} to initialise the Q-Former "
                f"({err.__class__.__name__}). Without internet, download it first (for example "
                f"`huggingface-cli download bert-base-uncased --local-dir /data/bert-base-uncased`) and "
                f"pass qformer.bert=/data/bert-base-uncased (and qformer.tokenizer=the same dir), or "
                f"qformer.bert=null for random init."
            ) from err
        source = bert.state_dict()
        target = self.state_dict()
        mapping = {}
        for key in source:
            new = key
            if key.startswith("bert.embeddings.LayerNorm"):
                new = key.replace("bert.embeddings.LayerNorm", "qformer.layernorm")
            elif key.startswith("bert.embeddings."):
                new = key.replace("bert.", "")
            elif key.startswith("bert.encoder."):
                new = "qformer." + key[len("bert."):].replace("attention.self.", "attention.attention.")
            elif key.startswith("cls.predictions."):
                new = key.replace("cls.predictions.", "lm_head.")
            else:
                continue
            mapping[new] = key
            if ".intermediate." in new or (".output." in new and ".attention." not in new):
                query_key = new.replace(".intermediate.", ".intermediate_query.").replace(
                    ".output.", ".output_query.")
                mapping[query_key] = key
        copied = []
        with torch.no_grad():
            for new, old in mapping.items():
                if new not in target or new == "lm_head.decoder.weight":
                    continue
                src, dst = source[old], target[new]
                if src.shape == dst.shape:
                    dst.copy_(src)
                elif src.dim() >= 1 and src.shape[1:] == dst.shape[1:] and src.shape[0] < dst.shape[0]:
                    # vocabulary grown by [DEC]: keep BERT's rows, leave the new row(s) as initialised
                    dst[: src.shape[0]].copy_(src)
                else:
                    raise ValueError(f"BERT weight {old} {tuple(src.shape)} does not fit {new} "
                                     f"{tuple(dst.shape)}: qformer sizes must match the BERT config")
                copied.append(new)
        untouched = sorted(set(target) - set(copied) - {"lm_head.decoder.weight"})
        log.info("Q-Former initialised from %s: %d tensors copied, %d fresh (cross-attention, heads, queries)",
                 bert_name_or_path, len(copied), len(untouched))
        return {"copied": sorted(copied), "fresh": untouched}


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    params = {id(p): p for p in module.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())

