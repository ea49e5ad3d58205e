"""A FlanT5 as the hub ships it (head not tied to the embeddings, config saying gelu_new), through the real
``llm=flant5`` preset: stage 2 -> export -> transformers gives our captions and logits (issue 17)."""

import json

import pytest
import torch
import torch.nn.functional as F
from t5_untied_fixture import build_untied_t5
from tiny_runs import tiny_run_cfg as make_cfg

# a random LM rarely ends early: max_new_tokens binds on every caption, min_new_tokens=5 on one
GEN = ["generation.num_beams=1", "generation.max_new_tokens=7", "generation.min_new_tokens=5"]





@pytest.fixture(scope="module")
def flan_dir(tmp_path_factory, cache):
    return build_untied_t5(tmp_path_factory.mktemp("hub") / "tiny-flan-t5", cache)


def flant5(flan_dir, *extra):
    return ["stage=2", "llm=flant5", f"llm.model={flan_dir}", "llm.precision=fp32", *GEN, *extra]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache, flan_dir):
    """A 2-step stage-2 run on the hub-style FlanT5, and its export."""
    from blip2_train.export import main
    from blip2_train.training.fit import train

    root = tmp_path_factory.mktemp("flant5_run")
    train(make_cfg(root / "run", cache, *flant5(flan_dir)))
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    main([f"ckpt_path={ckpt}", f"output_dir={root / 'hf'}"])
    return ckpt, root / "hf"


def images_and_inputs(module, cfg, hf_dir, count=6):
    from PIL import Image
    from transformers import AutoProcessor

    from blip2_train.training.fit import build_datamodule

    datamodule = build_datamodule(module.cfg, module)
    datamodule.setup("validate")
    images = torch.cat([b["image"] for b in datamodule.val_dataloader()])[:count]
    processor = AutoProcessor.from_pretrained(hf_dir)
    pil = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(images=[pil] * len(images), text=[cfg.generation.prompt] * len(images), return_tensors="pt")
    inputs["pixel_values"] = images  # the project's own eval transform, so both see the same pixels
    return images, inputs, processor


def captions(processor, out) -> list[str]:
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]


def test_untied_flant5_export_keeps_its_embeddings_and_gives_our_captions(exported, flan_dir):
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration, T5ForConditionalGeneration

    from blip2_train.training.modules import module_from_checkpoint

    ckpt, hf_dir = exported
    module, cfg = module_from_checkpoint(ckpt)
    llm = module.llm.model
    hub = T5ForConditionalGeneration.from_pretrained(flan_dir)
    # the LLM was read as the hub directory holds it: head and embeddings apart
    assert torch.equal(llm.shared.weight, hub.shared.weight) and torch.equal(llm.lm_head.weight, hub.lm_head.weight)
    assert not torch.equal(llm.lm_head.weight, llm.shared.weight)
    vocab = llm.shared.num_embeddings
    saved = load_file(str(hf_dir / "model.safetensors"))
    for name in ("shared", "lm_head"):  # the file holds the LLM's own tensors (+ the <image> row)
        assert torch.equal(saved[f"language_model.{name}.weight"][:vocab], getattr(llm, name).weight), name
    hf = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    lang = hf.language_model
    assert lang.lm_head.weight is not lang.shared.weight
    for name in ("shared", "lm_head", "encoder.embed_tokens", "decoder.embed_tokens"):
        ours = llm.get_submodule(name).weight
        assert torch.equal(lang.get_submodule(name).weight[:vocab], ours), name

    images, inputs, processor = images_and_inputs(module, cfg, hf_dir)
    with torch.no_grad():
        ours = module.generate(images)
        out = hf.generate(**inputs, generation_config=hf.generation_config)
        theirs = captions(processor, out)
        visual = module.visual_prompts(images)
        prompt = inputs["input_ids"][:, hf.config.num_query_tokens:]
        extra = {"decoder_input_ids": prompt[:, :3]}
        ours_logits = llm(inputs_embeds=torch.cat([visual, llm.shared(prompt)], 1), **extra).logits
        hf.vision_model.post_layernorm.eps = module.model.ln_vision.eps  # the export's one eps (README)
        hf_logits = hf(**inputs, **extra).logits[..., :vocab]
    diff = (ours_logits - hf_logits).abs().max().item()
    print("captions", ours, theirs, "max abs logit diff", diff)
    assert theirs == ours and all(ours)
    assert diff < 1e-5


def mlp_input(d_model: int) -> torch.Tensor:
    return torch.randn(3, 5, d_model, generator=torch.Generator().manual_seed(0))


def gated_mlp(ff, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """T5 v1.1's gated feed-forward, written out: wo(act(wi_0 x) * wi_1 x)."""
    return ff.wo(F.gelu(ff.wi_0(x), approximate=approximate) * ff.wi_1(x))


@pytest.mark.parametrize("act, approximate", [(None, "none"), ("gelu", "none"), ("gelu_new", "tanh")])
def test_flant5_activation_is_the_configured_one(cache, flan_dir, act, approximate):
    """llm=flant5 runs gelu by default (LAVIS, transformers' conversion); llm.dense_act_fn=gelu_new is
    the checkpoint's own. Checked on the loaded T5's feed-forward, against erf and tanh GELU by hand."""
    from blip2_train.models.llm import build_llm

    extra = [] if act is None else [f"llm.dense_act_fn={act}"]
    cfg = make_cfg("unused", cache, *flant5(flan_dir, *extra))
    llm, _ = build_llm(cfg.llm, cache)
    ff = llm.model.encoder.block[0].layer[1].DenseReluDense
    x = mlp_input(llm.model.config.d_model)
    with torch.no_grad():
        out = ff(x)
        chosen, other = gated_mlp(ff, x, approximate), gated_mlp(ff, x, "tanh" if approximate == "none" else "none")
    assert torch.allclose(out, chosen, atol=1e-6, rtol=0)
    assert (out - other).abs().max() > 1e-4  # the two GELUs are told apart on this input
    assert llm.model.config.dense_act_fn == (act or "gelu")


def test_flant5_export_carries_the_activation(exported):
    from transformers import Blip2ForConditionalGeneration

    from blip2_train.training.modules import module_from_checkpoint

    ckpt, hf_dir = exported
    assert json.loads((hf_dir / "config.json").read_text())["text_config"]["dense_act_fn"] == "gelu"
    module, _ = module_from_checkpoint(ckpt)
    hf = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    ours = module.llm.model.decoder.block[1].layer[2].DenseReluDense
    theirs = hf.language_model.decoder.block[1].layer[2].DenseReluDense
    x = mlp_input(hf.config.text_config.d_model)
    with torch.no_grad():
        assert torch.allclose(theirs(x), gated_mlp(ours, x, "none"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("value, message", [("relu", "gelu, gelu_new"), ("gelu", "encoder-decoder")])
def test_dense_act_fn_is_validated(cache, value, message):
    from blip2_train.config import validate

    llm = ["llm=flant5"] if message != "encoder-decoder" else ["llm=tiny_opt"]
    cfg = make_cfg("unused", cache, "stage=2", *llm, f"llm.dense_act_fn={value}")
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_exported_t5_plain_generate_gives_the_runs_captions(exported):
    """model.generate(**inputs) without generation_config: the run's lengths and end token still hold."""
    from transformers import Blip2ForConditionalGeneration

    from blip2_train.training.modules import module_from_checkpoint

    ckpt, hf_dir = exported
    module, cfg = module_from_checkpoint(ckpt)
    hf = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    inner = hf.language_model.generation_config
    assert (inner.max_new_tokens, inner.min_new_tokens) == (cfg.generation.max_new_tokens,
                                                            cfg.generation.min_new_tokens)
    images, inputs, processor = images_and_inputs(module, cfg, hf_dir)
    with torch.no_grad():
        ours = module.generate(images)
        plain = hf.generate(**inputs)
        documented = hf.generate(**inputs, generation_config=hf.generation_config)
    print("ours", ours, "plain", captions(processor, plain))
    assert captions(processor, plain) == ours and captions(processor, documented) == ours and all(ours)


def test_exported_beam_settings_reach_generate_through_its_generation_config(exported, tmp_path):
    """Beams (and length_penalty) cannot ride on the inner LM's config (transformers pops them): the
    documented call, generation_config=model.generation_config, gives our beam-search captions."""
    from transformers import Blip2ForConditionalGeneration

    from blip2_train.export import export_checkpoint
    from blip2_train.training.modules import module_from_checkpoint

    ckpt, _ = exported
    beams = ["generation.num_beams=3", "generation.length_penalty=0.5"]
    export_checkpoint(ckpt, tmp_path / "hf", overrides=beams)
    module, cfg = module_from_checkpoint(ckpt, beams)
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert (hf.generation_config.num_beams, hf.generation_config.length_penalty) == (3, 0.5)
    images, inputs, processor = images_and_inputs(module, cfg, tmp_path / "hf", count=4)
    with torch.no_grad():
        ours = module.generate(images)
        greedy = module.generate(images, num_beams=1)
        out = hf.generate(**inputs, generation_config=hf.generation_config)
    theirs = captions(processor, out)
    print("beams", ours, "greedy", greedy, "theirs", theirs)
    assert theirs == ours and all(ours)
    assert ours != greedy  # the beam settings change these captions: they did reach generate
