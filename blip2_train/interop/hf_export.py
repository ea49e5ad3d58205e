"""A checkpoint of ours -> a transformers BLIP-2 directory (model, processor, generation config).

Stage 1 -> ``Blip2ForImageTextRetrieval``; stage 2 -> ``Blip2ForConditionalGeneration``; a VQA model
whose Q-Former reads the question (``vqa.qformer_text_input=true``) -> ``InstructBlipForConditionalGeneration``
(its Q-Former embeds the question with word + absolute position embeddings after the queries and one
LayerNorm over both, as ours; ``qformer_input_ids`` must hold the bare question, the LLM ``text`` the
``vqa.prompt``-formatted one, docs/vqa.md). Each with a ``Blip2Processor`` (``InstructBlipProcessor``) (eval image size, CLIP mean/std, the run's tokenizer). The temperature and the
Q-Former LM head have no transformers home: they go to ``EXTRAS_FILE`` beside the model, which
``init_from=DIR`` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blip2_train.data.transforms import image_processor
from blip2_train.interop import EXTRAS_FILE, META_FILE
from blip2_train.interop.names import EXTRA_PREFIXES, QFORMER_PREFIXES, eva_to_hf_vision

IMAGE_TOKEN = "<image>"


def vision_config_and_state(encoder, ln_vision, vision: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """Blip2VisionConfig fields and ``vision_model.*`` tensors of our frozen encoder + ln_vision."""
    post_ln = {"vision_model.post_layernorm." + k: v for k, v in ln_vision.state_dict().items()}
    if encoder.kind != "eva":
        if vision:
            raise ValueError(
                f"encoder kind {encoder.kind!r} (CLIP) has a pre-LayerNorm (ln_pre) that transformers' "
                f"Blip2VisionModel lacks, so its vision tower cannot be exported exactly. Pass "
                f"export.vision=false to export everything else (the vision_model weights are then left "
                f"at their initialisation and must be supplied separately)")
        return {"hidden_size": encoder.width, "image_size": encoder.image_size}, post_ln
    vit = encoder.vit
    block = vit.blocks[0]
    config = {
        "hidden_size": encoder.width, "num_hidden_layers": encoder.depth,
        "num_attention_heads": block.attn.num_heads, "intermediate_size": block.mlp.fc1.out_features,
        "image_size": encoder.image_size, "patch_size": vit.patch_embed.patch_size[0],
        "layer_norm_eps": block.norm1.eps, "hidden_act": "gelu", "qkv_bias": True,
    }
    if not vision:
        return config, post_ln
    state = {k: v.float() for k, v in vit.state_dict().items()}
    hf = {"vision_model." + k: v for k, v in eva_to_hf_vision(state).items()}
    return config, {**hf, **post_ln}


def instruct_name(key: str) -> str:
    """Our Blip2-named export key -> InstructBlipForConditionalGeneration's: the text embeddings move under
    ``qformer.embeddings``, and the Q-Former's input LayerNorm (over [queries; text]) with them."""
    if key.startswith("qformer.layernorm."):
        return "qformer.embeddings.layernorm." + key.rsplit(".", 1)[1]
    if key.startswith("embeddings."):
        return "qformer." + key
    return key


def export_module(module, output_dir: str | Path, vision: bool = True) -> Path:
    """Write ``module`` (a Stage1Module or Stage2Module) as a transformers BLIP-2 directory."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
    )

    if getattr(module, "bridge_name", "qformer") != "qformer":  # an MLP bridge: LLaVA, or a clear refusal
        from blip2_train.interop.llava_export import export_llava

        return export_llava(module, output_dir)
    cfg = module.cfg
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    qformer = module.model
    vision_config, vision_state = vision_config_and_state(module.encoder, qformer.ln_vision, vision)
    ours = {k: v.detach().float().cpu() for k, v in qformer.state_dict().items()}
    state = dict(vision_state)
    state.update({k: v for k, v in ours.items() if k.startswith(QFORMER_PREFIXES)})
    extras = {k: v.contiguous() for k, v in ours.items()
              if k.startswith(EXTRA_PREFIXES) and k != "lm_head.decoder.weight"}  # decoder: tied to embeddings
    qformer_config = qformer.config.to_dict()
    stage = int(cfg.stage.name)

    if stage == 1:
        config = Blip2Config(vision_config=vision_config, qformer_config=qformer_config,
                             num_query_tokens=qformer.num_query_tokens,
                             image_text_hidden_size=int(cfg.qformer.embed_dim))
        config.qformer_config.use_qformer_text_input = True
        hf = Blip2ForImageTextRetrieval(config)
        # a copy: Blip2Processor adds an "<image>" token to its tokenizer (unused by retrieval)
        tokenizer = _copy_tokenizer(module.tokenizer, output_dir)
        processor = Blip2Processor(image_processor(cfg), tokenizer, num_query_tokens=None)
    else:
        from blip2_train.config import question_to_qformer

        vqa = cfg.stage.get("task", "caption") == "vqa"
        instruct = question_to_qformer(cfg)
        if instruct and not module.decoder_only:
            raise ValueError(
                "this VQA model's Q-Former reads the question (vqa.qformer_text_input=true) and its LLM is an "
                "encoder-decoder (FlanT5): transformers' InstructBlipForConditionalGeneration would fit, but our "
                "FlanT5 prompt layout (visual prompts + question in the encoder) is not checked against it: only "
                "decoder-only LLMs export with parity (a model fine-tuned with vqa.qformer_text_input=false "
                "exports to Blip2ForConditionalGeneration)")
        # the run's answer settings for a VQA model (vqa.*), its caption settings otherwise (generation.*)
        gen = cfg.vqa if vqa else cfg.generation
        tokenizer = _copy_tokenizer(module.llm_tokenizer, output_dir)
        processor = Blip2Processor(image_processor(cfg), tokenizer, num_query_tokens=qformer.num_query_tokens)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        llm = module.llm.model
        text_config = llm.config.to_dict()
        rows = llm.get_input_embeddings().num_embeddings
        text_config["vocab_size"] = max(rows, image_token_id + 1)
        # the LLM's own generation config is built from text_config (not read from generation_config.json),
        # and a plain model.generate(**inputs) uses it: captions end at our end token ("\n" for OPT, as in
        # the Salesforce/blip2-opt snapshots) and have the run's lengths. Beams, length_penalty and
        # suppress_tokens cannot go this way (transformers pops them from model configs): they reach
        # generate through generation_config=model.generation_config only (docs/checkpoints.md).
        text_config["eos_token_id"] = int(module.end_token_id)
        text_config["max_new_tokens"] = int(gen.max_new_tokens)
        text_config["min_new_tokens"] = int(gen.min_new_tokens)
        if instruct:  # the Q-Former reads the question: InstructBLIP's layout (its embeddings hold the LayerNorm)
            from transformers import (
                InstructBlipConfig,
                InstructBlipForConditionalGeneration,
                InstructBlipProcessor,
            )

            qformer_config.pop("use_qformer_text_input", None)
            config = InstructBlipConfig(vision_config=vision_config, qformer_config=qformer_config,
                                        text_config=text_config, num_query_tokens=qformer.num_query_tokens,
                                        image_token_index=image_token_id)
            hf = InstructBlipForConditionalGeneration(config)
            state = {instruct_name(k): v for k, v in state.items()}
            processor = InstructBlipProcessor(image_processor(cfg), tokenizer, _copy_tokenizer(module.tokenizer, output_dir),
                                              num_query_tokens=qformer.num_query_tokens)
        else:
            config = Blip2Config(vision_config=vision_config, qformer_config=qformer_config, text_config=text_config,
                                 num_query_tokens=qformer.num_query_tokens, image_token_index=image_token_id,
                                 use_decoder_only_language_model=module.decoder_only)
            config.qformer_config.use_qformer_text_input = False
            hf = Blip2ForConditionalGeneration(config)
        if llm.get_output_embeddings().weight is not llm.get_input_embeddings().weight:
            untie_lm_head(hf)
        llm_state = {k: v.detach().float().cpu() for k, v in llm.state_dict().items()}
        target = hf.language_model.state_dict()
        with torch.no_grad():
            for key, value in llm_state.items():
                if target[key].shape != value.shape:  # embeddings / head grown by the <image> row
                    grown = torch.zeros_like(target[key])  # that row never reaches the LLM
                    grown[: value.shape[0]] = value
                    value = grown
                target[key].copy_(value)
        state.update({"language_projection." + k: v.detach().float().cpu()
                      for k, v in module.language_projection.state_dict().items()})
        hf.generation_config.update(
            num_beams=int(gen.num_beams), max_new_tokens=int(gen.max_new_tokens),
            min_new_tokens=int(gen.min_new_tokens), do_sample=False,
            length_penalty=float(gen.length_penalty) if int(gen.num_beams) > 1 else 1.0,  # greedy: unused
            eos_token_id=int(module.end_token_id), pad_token_id=int(tokenizer.pad_token_id),
            suppress_tokens=[int(image_token_id)])  # the image token is input only
    hf_state = hf.state_dict()
    result = hf.load_state_dict({**hf_state, **state}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    hf.float().save_pretrained(str(output_dir))
    processor.save_pretrained(str(output_dir))
    from safetensors.torch import save_file

    if extras:
        save_file(extras, str(output_dir / EXTRAS_FILE))
    meta = {"stage": stage, "vision_tower": bool(vision and module.encoder.kind == "eva"),
            "prompt": (str(cfg.vqa.prompt) if stage == 2 and cfg.stage.get("task", "caption") == "vqa"
                       else str(cfg.generation.prompt) if stage == 2 else None),
            "extras": sorted(extras), "config": json.loads(json.dumps(dict_of(cfg)))}
    (output_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return output_dir


def untie_lm_head(hf) -> None:
    """Give ``hf.language_model`` an LM head of its own, as the exported LLM has (flan-t5's).

    transformers 5.x builds every T5 with ``lm_head`` tied to ``shared`` (T5Config forces
    ``tie_word_embeddings=True``), so copying an untied LLM's head in would write it over the input
    embeddings. With two tensors saved, ``from_pretrained`` keeps them apart (it ties only equal ones).
    """
    from torch import nn

    lang = hf.language_model
    head = lang.get_output_embeddings()
    name = next(n for n, m in lang.named_modules() if m is head) + ".weight"  # lm_head.weight
    head.weight = nn.Parameter(head.weight.detach().clone())
    lang.all_tied_weights_keys.pop(name, None)
    hf.all_tied_weights_keys.pop("language_model." + name, None)


def _copy_tokenizer(tokenizer, output_dir: Path):
    """A fresh copy of the LLM tokenizer (the processor adds <image> to it; ours stays untouched)."""
    from transformers import AutoTokenizer

    staging = output_dir / ".tokenizer_staging"
    tokenizer.save_pretrained(str(staging))
    copy = AutoTokenizer.from_pretrained(str(staging))
    for file in staging.iterdir():
        file.unlink()
    staging.rmdir()
    return copy


def dict_of(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)

