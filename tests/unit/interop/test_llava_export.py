"""bridge=mlp + CLIP + a decoder-only LLM exports to transformers' LLaVA with the same greedy captions;
a bridge with no transformers home fails with a message saying so."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs

register_configs()


def build(cache, *extra):
    from blip2_train.training.stage2 import Stage2Module

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(
            ["stage=2", "llm=tiny_opt", "encoder=tiny_clip", f"cache_dir={cache}", "llm.tiny.pretrain_steps=0",
             *extra]))
    torch.manual_seed(0)
    module = Stage2Module(cfg).eval()
    with torch.no_grad():  # a random LLM + bridge would repeat one token: give the bridge some scale
        for p in module.bridge.parameters():
            p.mul_(4.0)
    return module


@pytest.mark.parametrize("keep_cls", [False, True])
def test_mlp_bridge_exports_to_llava_with_the_same_greedy_captions(keep_cls, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from blip2_train.interop.hf_export import export_module

    module = build(tmp_path / "cache", "bridge=mlp", f"bridge.keep_cls={str(keep_cls).lower()}")
    out = export_module(module, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    torch.manual_seed(3)
    images = torch.rand(2, 64, 64, 3).mul(255).to(torch.uint8).numpy()
    # stage 2's order: visual prompts, then BOS + prompt (LLaVA's template puts BOS first)
    text = processor.image_token + processor.tokenizer.bos_token
    inputs = processor(images=list(images), text=[text] * 2, add_special_tokens=False, return_tensors="pt")
    assert int((inputs["input_ids"] == hf.config.image_token_index).sum()) == 2 * module.visual_tokens
    with torch.no_grad():
        # the same pixels through our path: the processor's normalised images are our eval transform's
        ours_prompts = module.visual_prompts(inputs["pixel_values"])
        theirs_prompts = hf.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        assert torch.allclose(torch.stack(list(theirs_prompts)), ours_prompts, atol=1e-5)
        ours = module.generate(inputs["pixel_values"], "", num_beams=1, max_new_tokens=8, min_new_tokens=8)
        ids = hf.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=8, min_new_tokens=8,
                          eos_token_id=module.end_token_id, pad_token_id=processor.tokenizer.pad_token_id)
    theirs = [t.strip() for t in processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True)]
    assert ours == theirs and all(ours)  # a random tiny LLM repeats itself, but the same way


@pytest.mark.parametrize("extra,message", [(["bridge=pool_mlp"], "bridge=pool_mlp has no transformers model"),
                                           (["bridge=mlp", "bridge.hidden_size=32"], "no transformers model holds"),
                                           (["bridge=mlp", "encoder=tiny_eva"], "needs a CLIP encoder")])
def test_bridges_without_a_transformers_home_fail_the_export(extra, message, tmp_path):
    from blip2_train.interop.hf_export import export_module

    module = build(tmp_path / "cache", *extra)
    with pytest.raises(ValueError, match=message):
        export_module(module, tmp_path / "out")
