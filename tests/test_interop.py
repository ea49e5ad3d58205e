"""Export to transformers and import from transformers / LAVIS (issue 4): exact parity on tiny runs."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs

register_configs()


def make_cfg(run_dir, cache, *overrides):
    base = [f"run_dir={run_dir}", f"cache_dir={cache}", "trainer.max_steps=2", "trainer=cpu",
            "trainer.enable_progress_bar=false", "logger=none", "data.batch_size=8", "data.eval_batch_size=16",
            "data.num_workers=0", "data.synthetic.num_train=32", "data.synthetic.num_val=12",
            "data.synthetic.samples_per_shard=16", "data.samples_per_epoch=32", "retrieval.k_test=4",
            "qformer.num_hidden_layers=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(base + list(overrides)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, cache):
    from blip2_train.train import train

    run = tmp_path_factory.mktemp("stage1")
    metrics = train(make_cfg(run, cache))
    return run / "checkpoints" / "last.ckpt", metrics


def val_batch(module):
    from blip2_train.train import build_datamodule

    datamodule = build_datamodule(module.cfg, module)
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


def test_stage1_export_equals_our_itc_and_itm(stage1_run, tmp_path):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval, Blip2Processor

    from blip2_train.checkpoint_io import module_from_checkpoint
    from blip2_train.export import main

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
    from blip2_train.train import build_datamodule

    datamodule = build_datamodule(module.cfg, module)
    datamodule.setup("validate")
    return list(datamodule.val_dataloader())


def test_stage1_export_ranks_validation_pairs_as_evaluate_does(stage1_run, tmp_path):
    """ITC and ITM re-ranked recall computed with transformers alone equal our evaluate's metrics."""
    from transformers import Blip2ForImageTextRetrieval

    from blip2_train.checkpoint_io import module_from_checkpoint
    from blip2_train.evaluate import evaluate
    from blip2_train.interop.hf_export import export_checkpoint
    from blip2_train.retrieval import retrieval_metrics

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
    from blip2_train.interop.hf_export import export_checkpoint
    from blip2_train.train import train

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
