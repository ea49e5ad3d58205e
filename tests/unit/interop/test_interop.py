"""Export to transformers and import from transformers / LAVIS (issue 4): exact parity on tiny runs."""

import json

import pytest
import torch
from tiny_runs import tiny_run_cfg as make_cfg


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, cache):
    from blip2_train.training.fit import train

    run = tmp_path_factory.mktemp("stage1")
    metrics = train(make_cfg(run, cache))
    return run / "checkpoints" / "last.ckpt", metrics


def val_batch(module):
    from blip2_train.training.fit import build_datamodule

    datamodule = build_datamodule(module.cfg, module)
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


def test_stage1_export_equals_our_itc_and_itm(stage1_run, tmp_path):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval, Blip2Processor

    from blip2_train.export import main
    from blip2_train.training.modules import module_from_checkpoint

    ckpt, _ = stage1_run
    main([f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'hf'}"])
    module, _ = module_from_checkpoint(ckpt)
    hf = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert isinstance(processor, Blip2Processor) and "[DEC]" in processor.tokenizer.get_vocab()
    assert processor.image_processor.size == {"height": 64, "width": 64}
    batch = val_batch(module)
    images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        embeds = module.model.encode_image(module.encoder(images))
        sim = torch.einsum("iqd,td->itq", module.model.image_features(module.model.query_forward(embeds)),
                           module.model.text_features(module.model.text_forward(ids, mask))).amax(-1)
        itc = hf(pixel_values=images, input_ids=ids, attention_mask=mask).logits_per_image
        itm = module.model.itm_logits(embeds, ids, mask)
        itm_hf = hf(pixel_values=images, input_ids=ids, attention_mask=mask,
                    use_image_text_matching_head=True).logits_per_image
    print("stage1 max abs diff itc", (sim - itc).abs().max().item(), "itm", (itm - itm_hf).abs().max().item())
    assert torch.allclose(sim, itc, atol=1e-5, rtol=0)
    assert torch.allclose(itm, itm_hf, atol=1e-5, rtol=0)


def all_val(module):
    from blip2_train.training.fit import build_datamodule

    datamodule = build_datamodule(module.cfg, module)
    datamodule.setup("validate")
    return list(datamodule.val_dataloader())


def test_stage1_export_ranks_validation_pairs_as_evaluate_does(stage1_run, tmp_path):
    """ITC and ITM re-ranked recall computed with transformers alone equal our evaluate's metrics."""
    from transformers import Blip2ForImageTextRetrieval

    from blip2_train.evaluate import evaluate
    from blip2_train.export import export_checkpoint
    from blip2_train.retrieval import retrieval_metrics
    from blip2_train.training.modules import module_from_checkpoint

    ckpt, _ = stage1_run
    export_checkpoint(ckpt, tmp_path / "hf")
    ours = evaluate(str(ckpt))["metrics"]
    module, cfg = module_from_checkpoint(ckpt)
    hf = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    batches = all_val(module)
    pad = module.tokenizer.pad_token_id
    length = max(b["input_ids"].shape[1] for b in batches)
    ids = torch.cat([torch.nn.functional.pad(b["input_ids"], (0, length - b["input_ids"].shape[1]), value=pad)
                     for b in batches])
    mask = torch.cat([torch.nn.functional.pad(b["attention_mask"], (0, length - b["attention_mask"].shape[1]))
                      for b in batches])
    image_ids = torch.cat([b["image_id"] for b in batches])
    images = torch.cat([b["image"] for b in batches])
    first = [image_ids.tolist().index(i) for i in dict.fromkeys(image_ids.tolist())]
    images = images[first]
    relevant = image_ids[first][:, None] == image_ids[None, :]
    with torch.no_grad():
        sim = hf(pixel_values=images, input_ids=ids, attention_mask=mask).logits_per_image  # [Ni, Nt]

        def pair_scores(image_index, text_index):
            out = hf(pixel_values=images[image_index], input_ids=ids[text_index], attention_mask=mask[text_index],
                     use_image_text_matching_head=True).logits_per_image
            return out[:, 1]

        theirs = retrieval_metrics(sim, relevant, cfg.retrieval.k_test, pair_scores)
    for name in ("itc/txt_r1", "itc/img_r1", "itm/txt_r1", "itm/img_r1"):
        assert theirs[name] == ours[name], name
    # every recall (the means are logged as float32 by Lightning, hence 1e-6)
    assert {k: pytest.approx(v, abs=1e-6) for k, v in theirs.items()} == {k: ours[k] for k in theirs}


def test_export_then_init_from_evaluates_the_same(stage1_run, cache, tmp_path, capsys):
    from blip2_train.evaluate import evaluate
    from blip2_train.export import export_checkpoint
    from blip2_train.training.fit import train

    ckpt, _ = stage1_run
    export_checkpoint(ckpt, tmp_path / "hf")
    assert (tmp_path / "hf" / "blip2_train_extras.safetensors").exists()
    train(make_cfg(tmp_path / "back", cache, "trainer.max_steps=0", f"init_from={tmp_path / 'hf'}"))
    report = capsys.readouterr().out
    assert "0 missing, 0 unexpected, 0 shape mismatches" in report
    back = evaluate(str(tmp_path / "back" / "checkpoints" / "last.ckpt"))["metrics"]
    assert back == evaluate(str(ckpt))["metrics"]
    original = torch.load(ckpt, weights_only=True)["state_dict"]
    restored = torch.load(tmp_path / "back" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in original.items():
        if key.startswith(("model.", "encoder.")):
            assert torch.equal(value, restored[key]), key


@pytest.mark.parametrize("llm", ["tiny_opt", "tiny_t5"])
def test_stage2_export_generates_our_greedy_captions(llm, cache, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from blip2_train.export import main
    from blip2_train.training.fit import train
    from blip2_train.training.modules import module_from_checkpoint

    gen = ["generation.num_beams=1", "generation.max_new_tokens=8", "generation.min_new_tokens=2"]
    train(make_cfg(tmp_path / "run", cache, "stage=2", f"llm={llm}", *gen))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    main([f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'hf'}"])
    module, cfg = module_from_checkpoint(ckpt)
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    images = torch.cat([b["image"] for b in all_val(module)])[:6]
    pil = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(images=[pil] * len(images), text=[cfg.generation.prompt] * len(images), return_tensors="pt")
    inputs["pixel_values"] = images  # the project's own eval transform, so both see the same pixels
    vocab = module.llm.model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        ours = module.generate(images)
        out = hf.generate(**inputs, generation_config=hf.generation_config)  # the run's generation.*
        if not hf.config.text_config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]
        theirs = [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
        # LM logits of one teacher-forced pass, over the LLM's own vocabulary
        visual = module.visual_prompts(images)
        embed = module.llm.model.get_input_embeddings()
        prompt = inputs["input_ids"][:, hf.config.num_query_tokens:]
        ours_embeds = torch.cat([visual, embed(prompt)], dim=1)
        extra = {} if module.decoder_only else {"decoder_input_ids": prompt[:, :3]}
        ours_logits = module.llm.model(inputs_embeds=ours_embeds, **extra).logits
        as_exported = (ours_logits - hf(**inputs, **extra).logits[..., :vocab]).abs().max().item()
        # Blip2VisionModel has one LayerNorm eps (EVA's 1e-6) where ln_vision has 1e-5: the one
        # difference of an export. With ln_vision's eps the forward is the same to fp32 rounding.
        hf.vision_model.post_layernorm.eps = module.model.ln_vision.eps
        hf_logits = hf(**inputs, **extra).logits[..., :vocab]
        eps_matched = (ours_logits - hf_logits).abs().max().item()
    print(llm, "captions", ours, theirs, "max abs logit diff", as_exported, "with ln_vision eps", eps_matched)
    assert theirs == ours and any(ours)
    assert eps_matched < 1e-5 and as_exported < 1e-3

    # the round trip: init_from the export, written as a checkpoint, evaluates as the original
    from blip2_train.evaluate import evaluate

    train(make_cfg(tmp_path / "back", cache, "stage=2", f"llm={llm}", *gen, "trainer.max_steps=0",
                   f"init_from={tmp_path / 'hf'}"))
    back = evaluate(str(tmp_path / "back" / "checkpoints" / "last.ckpt"))
    original = evaluate(str(ckpt))
    assert back["metrics"] == original["metrics"] and back["predictions"] == original["predictions"]


def test_caption_finetuned_model_exports_its_trained_vit(cache, tmp_path):
    """A stage-2 model whose ViT trained (encoder.freeze=false, as caption fine-tuning): the export from its
    checkpoint carries the trained ViT, not the pretrained file's, and transformers' Blip2ForConditionalGeneration
    computes our vision features and LM logits with it (the tolerances of the frozen-encoder export above)."""
    import open_clip
    from omegaconf import OmegaConf
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from blip2_train.export import main
    from blip2_train.models.encoders import build_image_encoder
    from blip2_train.training.fit import train
    from blip2_train.training.modules import module_from_checkpoint

    weights = tmp_path / "tiny_eva.pt"  # the pretrained ViT the run starts from
    torch.manual_seed(11)
    torch.save(open_clip.create_model("blip2-tiny-eva").state_dict(), weights)
    train(make_cfg(tmp_path / "run", cache, "stage=2", "llm=tiny_opt", f"encoder.pretrained={weights}",
                   "encoder.freeze=false", "optim.warmup_steps=0", "optim.lr=1e-3", "generation.num_beams=1"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    main([f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'hf'}"])
    module, cfg = module_from_checkpoint(ckpt)
    trained = {k[len("encoder.vit."):]: v for k, v in
               torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"].items()
               if k.startswith("encoder.vit.")}
    pretrained = build_image_encoder(OmegaConf.merge(cfg.encoder, {"freeze": True})).vit.state_dict()
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    exported = hf.vision_model.state_dict()
    pairs = [(f"encoder.layers.{i}.{theirs}", f"blocks.{i}.{ours}") for i in range(len(module.encoder.vit.blocks))
             for theirs, ours in (("self_attn.qkv.weight", "attn.qkv.weight"), ("mlp.fc1.weight", "mlp.fc1.weight"),
                                  ("layer_norm1.weight", "norm1.weight"))]
    pairs += [("embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
              ("embeddings.position_embedding", "pos_embed")]
    for theirs, ours in pairs:  # the trained ViT, which moved away from the pretrained file
        assert torch.equal(exported[theirs], trained[ours]), theirs
        assert not torch.equal(trained[ours], pretrained[ours]), ours
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    images = torch.cat([b["image"] for b in all_val(module)])[:6]
    pil = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(images=[pil] * len(images), text=[cfg.generation.prompt] * len(images), return_tensors="pt")
    inputs["pixel_values"] = images  # the project's own eval transform
    vocab = module.llm.model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        hf.vision_model.post_layernorm.eps = module.model.ln_vision.eps  # EVA's 1e-6 vs ln_vision's 1e-5
        ours_vision = module.model.ln_vision(module.encoder(images))
        vision_diff = (ours_vision - hf.vision_model(pixel_values=images).last_hidden_state).abs().max().item()
        visual = module.visual_prompts(images)
        prompt = inputs["input_ids"][:, hf.config.num_query_tokens:]
        embeds = torch.cat([visual, module.llm.model.get_input_embeddings()(prompt)], dim=1)
        logit_diff = (module.llm.model(inputs_embeds=embeds).logits - hf(**inputs).logits[..., :vocab]).abs().max().item()
    print("trained-ViT export: max abs vision diff", vision_diff, "logit diff", logit_diff)
    assert vision_diff < 1e-5 and logit_diff < 1e-5


def to_lavis(state: dict) -> dict:
    """Our stage-1 state dict written in LAVIS's naming (Blip2Qformer), as its .pth files hold it."""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder.vit."):
            out["visual_encoder." + key[len("encoder.vit."):]] = value
        elif key.startswith("model.ln_vision."):
            out["ln_vision." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.qformer.layernorm."):
            out["Qformer.bert.embeddings.LayerNorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.embeddings."):
            out["Qformer.bert.embeddings." + key[len("model.embeddings."):]] = value
        elif key.startswith("model.qformer."):
            out["Qformer.bert." + key[len("model.qformer."):].replace(".attention.attention.", ".attention.self.")
                .replace(".crossattention.attention.", ".crossattention.self.")] = value
        elif key.startswith("model.lm_head."):
            out["Qformer.cls.predictions." + key[len("model.lm_head."):]] = value
            if key == "model.lm_head.bias":  # LAVIS's state_dict() holds the tied decoder bias under both names
                out["Qformer.cls.predictions.decoder.bias"] = value
        elif key == "model.temp":
            out["temp"] = value.reshape(())  # LAVIS's temperature is 0-d
        elif key.startswith("model."):
            name = key[len("model."):]
            out[name.replace("vision_projection", "vision_proj").replace("text_projection", "text_proj")] = value
    return out


def test_lavis_checkpoint_reproduces_the_model(stage1_run, cache, tmp_path, capsys):
    from blip2_train.training.checkpoints import load_init
    from blip2_train.training.modules import module_from_checkpoint
    from blip2_train.training.stage1 import Stage1Module

    ckpt, _ = stage1_run
    source, cfg = module_from_checkpoint(ckpt)
    lavis = to_lavis(source.state_dict())
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in lavis and "visual_encoder.blocks.0.attn.q_bias" in lavis
    torch.save({"model": lavis}, tmp_path / "blip2_lavis.pth")
    torch.manual_seed(123)
    fresh = Stage1Module(cfg).eval()
    report = load_init(fresh, tmp_path / "blip2_lavis.pth")
    printed = capsys.readouterr().out
    assert "0 missing, 0 unexpected, 0 shape mismatches" in printed, printed
    assert len(report["matched"]) > 100
    batch = val_batch(source)
    images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for module in (source, fresh):
            embeds = module.model.encode_image(module.encoder(images))
            module.outputs = (module.model.itm_logits(embeds, ids, mask),
                              module.model.image_features(module.model.query_forward(embeds)),
                              module.model.text_features(module.model.text_forward(ids, mask)),
                              module.model.lm_logits(module.model.text_forward(ids, mask)),
                              module.model.temperature)
    for ours, imported in zip(source.outputs, fresh.outputs):
        assert torch.equal(ours, imported)


def test_lavis_tied_decoder_bias_is_one_tensor():
    """A LAVIS stage-1 state dict holds Qformer.cls.predictions.decoder.bias, tied to .bias: it maps onto
    lm_head.bias (nothing unexpected); a file whose two differ is not LAVIS's and is refused."""
    from blip2_train.interop.names import lavis_to_hf

    bias = torch.randn(5)
    both = lavis_to_hf({"Qformer.cls.predictions.bias": bias, "Qformer.cls.predictions.decoder.bias": bias})
    assert set(both) == {"lm_head.bias"} and torch.equal(both["lm_head.bias"], bias)
    alone = lavis_to_hf({"Qformer.cls.predictions.decoder.bias": bias})
    assert set(alone) == {"lm_head.bias"} and torch.equal(alone["lm_head.bias"], bias)
    with pytest.raises(ValueError, match="differs from Qformer.cls.predictions.bias"):
        lavis_to_hf({"Qformer.cls.predictions.bias": bias, "Qformer.cls.predictions.decoder.bias": bias + 1})


def test_pickled_objects_are_refused(tmp_path):
    import argparse  # any class outside torch's allow-list stands for code that unpickling would run

    from blip2_train.interop.state_dict import read_state_dict

    torch.save({"model": {"Qformer.x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pth")


def test_clip_vision_tower_export_stops_with_a_clear_message(cache, tmp_path):
    from blip2_train.interop.hf_export import export_module
    from blip2_train.training.stage1 import Stage1Module

    module = Stage1Module(make_cfg(tmp_path / "run", cache, "encoder=tiny_clip")).eval()
    with pytest.raises(ValueError, match="export.vision=false"):
        export_module(module, tmp_path / "hf")
    export_module(module, tmp_path / "hf", vision=False)
    meta = json.loads((tmp_path / "hf" / "blip2_train_export.json").read_text())
    assert meta["vision_tower"] is False and meta["stage"] == 1


def test_init_from_a_transformers_directory_not_written_by_us(cache, tmp_path, capsys):
    """A Blip2ForConditionalGeneration saved by transformers itself (as hub snapshots are) initialises stage 2."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from blip2_train.interop.hf_export import export_module
    from blip2_train.training.checkpoints import load_init
    from blip2_train.training.stage2 import Stage2Module

    module = Stage2Module(make_cfg(tmp_path / "run", cache, "stage=2", "llm=tiny_opt")).eval()
    export_module(module, tmp_path / "ours")  # only for a config of the right sizes
    torch.manual_seed(7)
    hub_like = Blip2ForConditionalGeneration(Blip2Config.from_pretrained(tmp_path / "ours")).eval()
    hub_like.save_pretrained(tmp_path / "hub")
    load_init(module, tmp_path / "hub")
    assert "0 missing, 0 unexpected, 0 shape mismatches" in capsys.readouterr().out
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = module.visual_prompts(images)
        image_embeds = hub_like.vision_model(images).last_hidden_state
        query = hub_like.qformer(query_embeds=hub_like.query_tokens.expand(2, -1, -1),
                                 encoder_hidden_states=image_embeds).last_hidden_state
        theirs = hub_like.language_projection(query)
    hub_like.vision_model.post_layernorm.eps = module.model.ln_vision.eps  # see docs/interop.md: the one eps
    with torch.no_grad():
        query = hub_like.qformer(query_embeds=hub_like.query_tokens.expand(2, -1, -1),
                                 encoder_hidden_states=hub_like.vision_model(images).last_hidden_state)
        theirs_eps = hub_like.language_projection(query.last_hidden_state)
    assert torch.allclose(ours, theirs_eps, atol=1e-5, rtol=0) and torch.allclose(ours, theirs, atol=1e-3, rtol=0)


def lavis_stage1_peer(cfg, vocab: int, dec_id: int, ids: torch.Tensor):
    """LAVIS's own ``Blip2Qformer`` (salesforce-lavis 1.0.2, blip2_train/bench/peer_lavis.py) at ``cfg``'s tiny
    sizes, its random weights; skips when the wheel cannot be fetched."""
    from torch import nn

    from blip2_train.bench.peer_lavis import LavisUnavailable, build

    try:
        sizes = {k: cfg.qformer[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "num_query_tokens")}
        torch.manual_seed(7)
        peer = build({"vocab": vocab, "width": 64}, sizes, ids)
    except LavisUnavailable as err:
        pytest.skip(f"LAVIS's own Q-Former is needed: {err}")
    peer.tokenizer.bos_token_id = dec_id  # [DEC]
    hidden, embed_dim = cfg.qformer.hidden_size, cfg.qformer.embed_dim  # LAVIS's embed_dim argument
    peer.vision_proj, peer.text_proj = nn.Linear(hidden, embed_dim), nn.Linear(hidden, embed_dim)
    # independent random values everywhere (LAVIS starts biases at 0, LayerNorms at 1, the query FFNs
    # as copies of the text FFNs, weights at std 0.02): a swapped or misplaced tensor changes the losses
    with torch.no_grad():
        for name, param in peer.named_parameters():
            param.normal_(1.0, 0.2) if name.endswith(("LayerNorm.weight", "ln_vision.weight")) else param.normal_(0, 0.1)
        peer.temp.fill_(0.05)
    return peer.eval()


def test_lavis_own_blip2qformer_file_gives_lavis_own_losses(cache, tmp_path, capsys, monkeypatch):
    """A .pth saved by LAVIS's own Blip2Qformer ({"model": state_dict()}, not built from our name map) loads
    with nothing unexpected (missing: only the ViT, its visual_encoder being the identity here), and our
    ITC / ITM / ITG losses equal LAVIS's forward on one batch (dropout off, the same image tokens and ids,
    ITM negatives by argmax on both sides)."""
    from blip2_train.training.checkpoints import load_init
    from blip2_train.training.stage1 import Stage1Module

    cfg = make_cfg(tmp_path / "run", cache, "qformer.num_query_tokens=8", "qformer.embed_dim=32")
    module = Stage1Module(cfg).eval()
    vocab, dec_id = module.model.config.vocab_size, module.dec_token_id
    batch_size, length = 6, 12
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab // 4, vocab, (batch_size, length), generator=g)
    ids[ids == dec_id] = vocab // 4
    ids[:, 0] = module.tokenizer.cls_token_id
    tokens = torch.randn(batch_size, module.encoder.num_tokens, module.encoder.width, generator=g)
    assert module.encoder.width == 64

    peer = lavis_stage1_peer(cfg, vocab, dec_id, ids)
    lavis_state = peer.state_dict()
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis_state
    torch.save({"model": lavis_state}, tmp_path / "lavis_own.pth")
    report = load_init(module, tmp_path / "lavis_own.pth")
    printed = capsys.readouterr().out
    assert not report["unexpected"] and not report["mismatched"], printed
    # only the ViT is missing: the peer's visual_encoder is the identity (image tokens fed directly)
    assert report["missing"] and all(k.startswith("encoder.") for k in report["missing"]), printed
    assert all(k.startswith("model.") for k in report["matched"]) and len(report["matched"]) > 50

    monkeypatch.setattr(module, "_pad_for_gather", lambda ids, mask: (ids, mask))  # one process, no Trainer
    monkeypatch.setattr(torch, "multinomial", lambda weights, n, generator=None: weights.argmax(-1, keepdim=True))
    with torch.no_grad():
        theirs = peer({"image": tokens, "text_input": [""] * batch_size})  # its tokenizer returns ids
        ours = module.stage1_losses({"vision_tokens": tokens, "input_ids": ids, "image_id": torch.arange(batch_size),
                                     "attention_mask": torch.ones_like(ids)})
    pairs = {"itc": theirs.loss_itc, "itm": theirs.loss_itm, "itg": theirs.loss_lm, "loss": theirs.loss}
    for name, value in pairs.items():
        assert torch.allclose(ours[name], value, rtol=0, atol=1e-5), (name, ours[name].item(), value.item())
