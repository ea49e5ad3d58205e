"""Stage 2 with ``bridge=mlp``, a CLIP encoder and a decoder-only LLM is LLaVA-1.5's architecture: export
it as transformers' ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

The parts map one to one: open_clip's ViT (its kept blocks, ``ln_pre`` included) -> ``CLIPVisionModel``
with as many layers, read at ``vision_feature_layer=-1`` (the last kept block = the original's
second-to-last); ``MLPBridge`` -> ``multi_modal_projector`` (same names, exact GELU); the LLM as it is.
CLS dropped -> ``vision_feature_select_strategy="default"``, kept -> ``"full"``. The image placeholder
is the tokenizer's unknown token (a byte-level BPE never produces it from text), so the vocabulary
and the LM head stay unchanged. The processor puts one placeholder per visual token in front of the
text. Stage 2 puts the visual prompts in front of BOS + prompt, where LLaVA's template puts BOS first;
for our captions give the processor that order: ``text=processor.image_token + tokenizer.bos_token + prompt``
with ``add_special_tokens=False`` (tests/unit/interop/test_llava_export.py checks greedy captions that way).

Bridges without a transformers home (``pool_mlp``: LLaVA has no pooling; an MLP of another width; EVA
encoders; encoder-decoder LLMs) stop with a message saying so.
"""

from __future__ import annotations

from pathlib import Path

import torch


def llava_export_problem(module) -> str | None:
    """Why ``module`` has no ``LlavaForConditionalGeneration`` home, or None when it has one."""
    bridge = getattr(module, "bridge_name", "qformer")
    if bridge == "pool_mlp":
        return ("bridge=pool_mlp has no transformers model: LLaVA's projector reads every patch token and "
                "transformers has no pooled (DeCo) projector. Export a bridge=mlp or bridge=qformer run, or use "
                "the checkpoint with python -m blip2_train.generate")
    if bridge != "mlp":
        return f"bridge={bridge} has no LLaVA export"
    width = module.llm.model.get_input_embeddings().embedding_dim
    if module.bridge.linear_1.out_features != width:
        return (f"bridge.hidden_size={module.bridge.linear_1.out_features} differs from the LLM width {width}: "
                f"transformers' LLaVA projector has the LLM's width inside; no transformers model holds it")
    if module.encoder.kind != "clip":
        return (f"encoder={module.cfg.encoder.name} (a timm EVA) has no transformers vision model that LLaVA loads; "
                f"the LLaVA export needs a CLIP encoder (encoder=clip or tiny_clip)")
    if not module.decoder_only:
        return (f"llm={module.cfg.llm.name} is an encoder-decoder: LlavaForConditionalGeneration needs a "
                f"decoder-only LLM (llm=opt or tiny_opt)")
    return None


def clip_vision_config_and_state(encoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """open_clip ViT (our kept blocks) -> transformers ``CLIPVisionModel`` config and state dict."""
    vit = encoder.vit
    blocks = vit.transformer.resblocks
    width = encoder.width
    heads = blocks[0].attn.num_heads
    act = blocks[0].mlp.gelu
    hidden_act = "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"
    config = {"hidden_size": width, "intermediate_size": blocks[0].mlp.c_fc.out_features,
              "num_hidden_layers": len(blocks), "num_attention_heads": heads, "image_size": encoder.image_size,
              "patch_size": vit.patch_size[0], "hidden_act": hidden_act, "layer_norm_eps": vit.ln_pre.eps,
              "projection_dim": width}
    p = "vision_model."
    state = {p + "embeddings.patch_embedding.weight": vit.conv1.weight,
             p + "embeddings.class_embedding": vit.class_embedding,
             p + "embeddings.position_embedding.weight": vit.positional_embedding,
             p + "pre_layrnorm.weight": vit.ln_pre.weight, p + "pre_layrnorm.bias": vit.ln_pre.bias,
             # unused by LLaVA (it reads hidden states), present in the model: the identity
             p + "post_layernorm.weight": torch.ones(width), p + "post_layernorm.bias": torch.zeros(width)}
    for i, block in enumerate(blocks):
        q = f"{p}encoder.layers.{i}."
        for name, w in zip(("q_proj", "k_proj", "v_proj"), block.attn.in_proj_weight.chunk(3)):
            state[f"{q}self_attn.{name}.weight"] = w
        for name, b in zip(("q_proj", "k_proj", "v_proj"), block.attn.in_proj_bias.chunk(3)):
            state[f"{q}self_attn.{name}.bias"] = b
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, part in pairs.items():
            state[f"{q}{name}.weight"], state[f"{q}{name}.bias"] = part.weight, part.bias
    return config, {k: v.detach().float().cpu().clone() for k, v in state.items()}


def export_llava(module, output_dir: str | Path) -> Path:
    """Write ``module`` (a Stage2Module with bridge=mlp) as a transformers LLaVA directory."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from blip2_train.data.transforms import image_processor

    problem = llava_export_problem(module)
    if problem:
        raise ValueError(f"cannot export to transformers: {problem}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vision_config, vision_state = clip_vision_config_and_state(module.encoder)
    llm = module.llm.model
    tokenizer = module.llm_tokenizer
    image_token = tokenizer.unk_token
    keep_cls = module.bridge.keep_cls
    # untied: OPT ties its head to the decoder's embeddings, which LLaVA's tying map does not find (it
    # looks for language_model.embed_tokens); the head is written out beside them instead
    text_config = {**llm.config.to_dict(), "tie_word_embeddings": False}
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision_config), text_config=text_config,
                         image_token_index=tokenizer.unk_token_id, projector_hidden_act="gelu",
                         vision_feature_select_strategy="full" if keep_cls else "default",
                         vision_feature_layer=-1, image_seq_length=module.visual_tokens,
                         multimodal_projector_bias=True, tie_word_embeddings=False)
    hf = LlavaForConditionalGeneration(config).eval()
    tower = hf.model.vision_tower  # CLIPVisionModel (keys under vision_model.) or its transformer alone
    if not any(k.startswith("vision_model.") for k in tower.state_dict()):
        vision_state = {k.removeprefix("vision_model."): v for k, v in vision_state.items()}
    tower.load_state_dict(vision_state, strict=True)
    hf.model.multi_modal_projector.load_state_dict(
        {k: v.detach().float() for k, v in module.bridge.state_dict().items()}, strict=True)
    hf.model.language_model.load_state_dict(llm.base_model.state_dict(), strict=True)
    hf.lm_head.load_state_dict(llm.get_output_embeddings().state_dict(), strict=True)
    hf.save_pretrained(output_dir)
    processor = LlavaProcessor(image_processor(module.cfg), tokenizer, patch_size=vision_config["patch_size"],
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               image_token=image_token, num_additional_image_tokens=1)
    processor.save_pretrained(output_dir)
    return output_dir
