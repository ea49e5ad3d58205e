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
