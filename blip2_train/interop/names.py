"""Key names: ours <-> transformers' BLIP-2 <-> LAVIS (docs/blip2_numerics.md section 6).

Our module's state dict: ``encoder.vit.*`` (a timm EVA trunk or an open_clip ViT), ``model.*`` (the
Q-Former, named as transformers names it, plus ``ln_vision``, ``lm_head`` and ``temp``),
``language_projection.*`` and ``llm.model.*``. Every function here is a pure rename of tensors.
"""

from __future__ import annotations

import re

import torch

# Our Q-Former keys that transformers' Blip2ForImageTextRetrieval holds under the same name.
QFORMER_PREFIXES = ("query_tokens", "embeddings.", "qformer.", "vision_projection.", "text_projection.",
                    "itm_head.")
# Values with no transformers home: written beside an export (EXTRAS_FILE) and read back on import.
EXTRA_PREFIXES = ("temp", "lm_head.")

# timm EVA block -> Blip2VisionModel layer (the same layout, one to one)
_EVA_TO_HF = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
]
_HF_TO_EVA = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
]


def _rename(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def eva_to_hf_vision(vit_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm EVA trunk tensors -> ``Blip2VisionModel`` tensors (without post_layernorm).

    The q and v biases become one qkv bias ``[q, 0, v]``. A tensor with no counterpart (rotary
    embeddings, layer scale, SwiGLU of later EVAs) stops the export with its name.
    """
    out, unmapped = {}, []
    for key, value in vit_state.items():
        match = re.match(r"^blocks\.(\d+)\.attn\.(q_bias|v_bias)$", key)
        if match:
            if match.group(2) == "q_bias":
                v_bias = vit_state[key.replace("q_bias", "v_bias")]
                out[f"encoder.layers.{match.group(1)}.self_attn.qkv.bias"] = torch.cat(
                    [value, torch.zeros_like(value), v_bias])
            continue
        new = _rename(key, _EVA_TO_HF)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise ValueError(f"these EVA tensors have no place in transformers' Blip2VisionModel: {unmapped[:8]}; "
                         f"only plain EVA-01 trunks (encoder=eva or tiny_eva) export their vision tower")
    return out


def hf_vision_to_eva(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``Blip2VisionModel`` tensors (no prefix) -> timm EVA names; also the keys it could not place."""
    out, unmapped = {}, []
    for key, value in hf_state.items():
        match = re.match(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key)
        if match:
            q, _, v = value.chunk(3)
            out[f"blocks.{match.group(1)}.attn.q_bias"] = q
            out[f"blocks.{match.group(1)}.attn.v_bias"] = v
            continue
        new = _rename(key, _HF_TO_EVA)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    return out, unmapped


def hf_to_ours(state: dict[str, torch.Tensor], encoder_kind: str) -> dict[str, torch.Tensor]:
    """A transformers BLIP-2 state dict (+ extras) -> our module's names.

    Keys with no counterpart keep a recognisable name so that the import report lists them as
    unexpected (for example a CLIP encoder cannot take a ``vision_model`` tower).
    """
    out, vision = {}, {}
    for key, value in state.items():
        if key.startswith("vision_model.post_layernorm."):
            out["model.ln_vision." + key.split(".", 2)[2]] = value
        elif key.startswith("vision_model."):
            vision[key[len("vision_model."):]] = value
        elif key.startswith(QFORMER_PREFIXES):
            out["model." + key] = value
        elif key == "temp" or key.startswith("lm_head."):
            out["model." + key] = value.reshape(1) if key == "temp" else value
        elif key.startswith("language_projection."):
            out[key] = value
        elif key.startswith("language_model."):
            out["llm.model." + key[len("language_model."):]] = value
        else:
            out[key] = value
    if vision:
        if encoder_kind == "eva":
            mapped, unmapped = hf_vision_to_eva(vision)
            out.update({"encoder.vit." + k: v for k, v in mapped.items()})
            out.update({"vision_model." + k: vision[k] for k in unmapped})
        else:
            out.update({"vision_model." + k: v for k, v in vision.items()})
    if "model.embeddings.word_embeddings.weight" in out and "model.lm_head.transform.dense.weight" in out:
        out["model.lm_head.decoder.weight"] = out["model.embeddings.word_embeddings.weight"]  # tied, as in BERT
    return out


# ------------------------------------------------------------------------------------------ LAVIS
def lavis_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS ``Blip2Qformer`` / ``Blip2OPT`` / ``Blip2T5`` names -> transformers names (+ extras).

    ``visual_encoder.*`` is LAVIS's EVA ViT, whose names equal timm's: it is converted through
    :func:`eva_to_hf_vision`. The LLM (``opt_model``/``t5_model``) is dropped: it comes from its own weights.
    """
    out, visual = {}, {}
    for key, value in state.items():
        if key.startswith("visual_encoder."):
            visual[key[len("visual_encoder."):]] = value
        elif key.startswith("ln_vision."):
            out["vision_model.post_layernorm." + key[len("ln_vision."):]] = value
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            out["qformer.layernorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("Qformer.bert.embeddings."):
            if not key.endswith("position_ids"):
                out["embeddings." + key[len("Qformer.bert.embeddings."):]] = value
        elif key.startswith("Qformer.bert."):
            new = "qformer." + key[len("Qformer.bert."):]
            out[new.replace(".attention.self.", ".attention.attention.")
                .replace(".crossattention.self.", ".crossattention.attention.")] = value
        elif key == "Qformer.cls.predictions.decoder.bias":
            # BERT's (LAVIS's) MLM head ties decoder.bias to predictions.bias: one tensor saved under both
            # names by state_dict(). Ours holds it once, as lm_head.bias.
            tied = state.get("Qformer.cls.predictions.bias")
            if tied is None:
                out["lm_head.bias"] = value
            elif not torch.equal(tied, value):
                raise ValueError("Qformer.cls.predictions.decoder.bias differs from Qformer.cls.predictions.bias, "
                                 "which LAVIS ties to it: the file was not written by LAVIS's Blip2Qformer")
        elif key.startswith("Qformer.cls.predictions."):
            out["lm_head." + key[len("Qformer.cls.predictions."):]] = value
        elif key.startswith(("opt_proj.", "t5_proj.")):
            out["language_projection." + key.split(".", 1)[1]] = value
        elif key.startswith("vision_proj."):
            out["vision_projection." + key.split(".", 1)[1]] = value
        elif key.startswith("text_proj."):
            out["text_projection." + key.split(".", 1)[1]] = value
        elif key == "temp":
            out["temp"] = value.reshape(1)  # LAVIS's 0-d temperature; ours has shape [1]
        elif key.startswith(("opt_model.", "t5_model.")):
            continue
        else:  # query_tokens, itm_head.*; anything else is reported as unexpected
            out[key] = value
    if visual:
        # LAVIS keeps all 40 blocks and a final norm; BLIP-2 uses 39 (the report lists the rest)
        norm = {k: v for k, v in visual.items() if not re.match(r"^(blocks\.\d+\.|cls_token|pos_embed|patch_embed)", k)}
        vit = {k: v for k, v in visual.items() if k not in norm}
        out.update({"vision_model." + k: v for k, v in eva_to_hf_vision(vit).items()})
        out.update({"visual_encoder." + k: v for k, v in norm.items()})
    return out


def is_lavis_state(keys) -> bool:
    return any(k.startswith(("Qformer.", "visual_encoder.")) for k in keys)
