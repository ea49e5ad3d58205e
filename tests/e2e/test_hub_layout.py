"""The path of a user with downloaded weights, through the real presets at tiny sizes (issue 21):
``encoder=eva encoder.pretrained=FILE``, ``qformer.bert=DIR``, ``llm=opt|flant5 llm.model=DIR``
(tests/hub_fixtures.py). Stage 1 -> stage 2 -> resume -> evaluate -> generate -> export ->
transformers -> init_from; the same from an FSDP run's sharded checkpoint and its consolidated file.
Checkpoints leave the frozen parts out and record where they come from; every reader rebuilds them."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from hub_fixtures import hub_overrides
from hydra import compose, initialize_config_dir

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs

register_configs()
SMALL = ["trainer=cpu", "trainer.enable_progress_bar=false", "logger=none", "data.batch_size=8",
         "data.eval_batch_size=16", "data.num_workers=0", "data.synthetic.num_train=32", "data.synthetic.num_val=8",
         "data.synthetic.samples_per_shard=16", "data.samples_per_epoch=32", "retrieval.k_test=4",
         "trainer.log_every_n_steps=1"]
GEN = ["generation.num_beams=1", "generation.max_new_tokens=6", "generation.min_new_tokens=2"]
LLM_DIRS = {"opt": "opt_dir", "flant5": "t5_dir"}



def make_cfg(run, cache, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(
            [f"run_dir={run}", f"cache_dir={cache}", *SMALL, *overrides]))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, cache, open_clip_file, bert_dir):
    from blip2_train.training.fit import train

    run = tmp_path_factory.mktemp("stage1")
    metrics = train(make_cfg(run, cache, "trainer.max_steps=2", *hub_overrides(open_clip_file, bert_dir)))
    return run / "checkpoints" / "last.ckpt", metrics


def test_stage1_from_hub_files_omits_the_encoder_and_every_reader_rebuilds_it(stage1, open_clip_file, bert_dir,
                                                                              tmp_path):
    """The checkpoint leaves the frozen encoder out and records its file; evaluate gives the run's
    metrics; the export's vision tower is the file's."""
    from safetensors.torch import load_file

    from blip2_train.evaluate import evaluate
    from blip2_train.export import main as export_main
    from blip2_train.training.modules import module_from_checkpoint

    ckpt, metrics = stage1
    saved = torch.load(ckpt, weights_only=True)
    assert saved["omitted_parts"] == {"encoder": {"prefix": "encoder.", "override": "encoder.pretrained",
                                                  "source": str(open_clip_file)}}
    assert not [k for k in saved["state_dict"] if k.startswith("encoder.")]
    assert "model.qformer.encoder.layer.0.attention.attention.query.weight" in saved["state_dict"]
    result = evaluate(str(ckpt))["metrics"]
    for name in ("itc/txt_r1", "itc/img_r1", "itm/txt_r1", "itm/img_r_mean"):
        assert result[name] == pytest.approx(metrics[name], abs=1e-6), name
    module, _ = module_from_checkpoint(ckpt)
    source = torch.load(open_clip_file, weights_only=True)
    assert torch.equal(module.encoder.vit.patch_embed.proj.weight, source["visual.trunk.patch_embed.proj.weight"])
    assert torch.equal(module.encoder.vit.blocks[2].mlp.fc1.weight, source["visual.trunk.blocks.2.mlp.fc1.weight"])
    export_main([f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'hf'}"])
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(exported["vision_model.embeddings.patch_embedding.weight"],
                       source["visual.trunk.patch_embed.proj.weight"])


def test_qformer_starts_from_the_bert_directory_with_dec_added(cache, open_clip_file, bert_dir, tmp_path):
    """qformer.bert=DIR: its tokenizer gains [DEC] (one row more), BERT's rows and layers are copied."""
    from transformers import BertForMaskedLM

    from blip2_train.training.stage1 import Stage1Module

    module = Stage1Module(make_cfg(tmp_path, cache, *hub_overrides(open_clip_file, bert_dir)))
    bert = BertForMaskedLM.from_pretrained(bert_dir)
    rows = bert.config.vocab_size
    assert len(module.tokenizer) == rows + 1 and module.tokenizer.bos_token_id == rows  # [DEC] appended
    words = module.model.embeddings.word_embeddings.weight
    assert words.shape[0] == rows + 1 and torch.equal(words[:rows], bert.bert.embeddings.word_embeddings.weight)
    assert torch.equal(module.model.qformer.encoder.layer[1].attention.attention.query.weight,
                       bert.bert.encoder.layer[1].attention.self.query.weight)


def test_a_fine_tuned_encoder_stays_in_the_checkpoint(cache, open_clip_file, bert_dir, tmp_path):
    """encoder.freeze=false: the encoder trains, so it is no longer rebuildable from its file."""
    from blip2_train.training.stage1 import Stage1Module

    module = Stage1Module(make_cfg(tmp_path, cache, *hub_overrides(open_clip_file, bert_dir), "encoder.freeze=false"))
    checkpoint = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["omitted_parts"] == {} and "encoder.vit.pos_embed" in checkpoint["state_dict"]


def test_resume_checks_every_key_but_the_omitted_parts(cache, open_clip_file, bert_dir, tmp_path):
    """Resuming loads strictly up to the omitted parts: a weight missing elsewhere, or one too many, stops it."""
    from blip2_train.training.stage1 import Stage1Module

    module = Stage1Module(make_cfg(tmp_path, cache, *hub_overrides(open_clip_file, bert_dir)))
    checkpoint = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(checkpoint)
    assert sorted(checkpoint["omitted_parts"]) == ["encoder"]
    module.on_load_checkpoint(checkpoint)  # the encoder is left out: fine
    key = "model.qformer.encoder.layer.1.attention.attention.query.weight"
    value = checkpoint["state_dict"].pop(key)
    with pytest.raises(ValueError, match=f"missing \\['{key}'\\]"):
        module.on_load_checkpoint(checkpoint)
    checkpoint["state_dict"].update({key: value, "model.extra": value})
    with pytest.raises(ValueError, match="unexpected \\['model.extra'\\]"):
        module.on_load_checkpoint(checkpoint)


def _image(cache, tmp_path):
    shard = next((cache / "synthetic").glob("*/val/*.tar"))
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        (tmp_path / "x.png").write_bytes(tar.extractfile(member).read())
    return tmp_path / "x.png"


def _val_images(module):
    from blip2_train.training.fit import build_datamodule

    datamodule = build_datamodule(module.cfg, module)
    datamodule.setup("validate")
    return torch.cat([b["image"] for b in datamodule.val_dataloader()])


def check_export(module, cfg, ckpt, llm_dir, out, llm):
    """export -> transformers: the same greedy captions as ours, and the LLM's own embeddings (and, for
    T5, its own untied head) in the saved model."""
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoProcessor,
        Blip2ForConditionalGeneration,
    )

    from blip2_train.export import main as export_main

    export_main([f"ckpt_path={ckpt}", f"output_dir={out}"])
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    images = _val_images(module)[:6]
    inputs = processor(images=[Image.new("RGB", (64, 64))] * len(images), text=[cfg.generation.prompt] * len(images),
                       return_tensors="pt")
    inputs["pixel_values"] = images
    with torch.no_grad():
        ours = module.generate(images)
        generated = hf.generate(**inputs, generation_config=hf.generation_config)
    if not hf.config.text_config.is_encoder_decoder:
        generated = generated[:, inputs["input_ids"].shape[1]:]
    theirs = [t.strip() for t in processor.batch_decode(generated, skip_special_tokens=True)]
    print(llm, "ours", ours, "transformers", theirs)
    assert theirs == ours and all(ours)
    loader = AutoModelForCausalLM if llm == "opt" else AutoModelForSeq2SeqLM
    own = loader.from_pretrained(llm_dir)
    rows = own.get_input_embeddings().num_embeddings
    saved = load_file(str(out / "model.safetensors"))
    embed_key = "language_model.model.decoder.embed_tokens.weight" if llm == "opt" else "language_model.shared.weight"
    assert torch.equal(saved[embed_key][:rows], own.get_input_embeddings().weight)
    assert torch.equal(hf.language_model.get_input_embeddings().weight[:rows], own.get_input_embeddings().weight)
    if llm == "flant5":  # flan-t5's head is its own tensor: exported as it is, not over the embeddings
        assert torch.equal(saved["language_model.lm_head.weight"][:rows], own.lm_head.weight)
        assert not torch.equal(own.lm_head.weight, own.shared.weight)
        assert torch.equal(hf.language_model.lm_head.weight[:rows], own.lm_head.weight)
    return ours


@pytest.mark.parametrize("llm", ["opt", "flant5"])
def test_stage2_with_a_hub_llm_trains_resumes_evaluates_generates_exports_and_reimports(
        llm, stage1, cache, open_clip_file, bert_dir, request, tmp_path):
    from blip2_train.evaluate import evaluate
    from blip2_train.generate import generate
    from blip2_train.generate import main as generate_main
    from blip2_train.training.fit import train
    from blip2_train.training.modules import MissingSourceError, module_from_checkpoint

    llm_dir = request.getfixturevalue(LLM_DIRS[llm])
    stage1_ckpt, _ = stage1
    hub = hub_overrides(open_clip_file, bert_dir, llm, llm_dir)
    run = tmp_path / "run"
    first = train(make_cfg(run, cache, *hub, *GEN, "trainer.max_steps=2", f"init_from={stage1_ckpt}"))
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["omitted_parts"]["llm"] == {"prefix": "llm.", "override": "llm.model", "source": str(llm_dir)}
    assert saved["omitted_parts"]["encoder"]["source"] == str(open_clip_file)
    assert not [k for k in saved["state_dict"] if k.startswith(("llm.", "encoder."))]
    assert "language_projection.weight" in saved["state_dict"]

    # resume from last.ckpt: the frozen parts rebuilt, every other weight loaded back
    second = train(make_cfg(run, cache, *hub, *GEN, "trainer.max_steps=3", f"init_from={stage1_ckpt}"))
    assert first["global_step"] == 2 and second["global_step"] == 3 and second["resumed_from_step"] == 2

    result = evaluate(str(ckpt))
    assert result["metrics"]["val/loss"] == pytest.approx(second["val/loss"], rel=1e-5)
    assert len(result["predictions"]) == 8 and all(result["predictions"].values())

    caption = generate(str(ckpt), str(_image(cache, tmp_path)))
    assert any(ch.isalpha() for ch in caption), caption

    module, cfg = module_from_checkpoint(ckpt)
    ours = check_export(module, cfg, ckpt, llm_dir, tmp_path / "hf", llm)

    # the weights moved: the recorded source is gone; llm.model=DIR points at them again
    moved = dict(saved, omitted_parts={**saved["omitted_parts"],
                                       "llm": {**saved["omitted_parts"]["llm"], "source": str(tmp_path / "gone")}})
    torch.save(moved, tmp_path / "moved.ckpt")
    with pytest.raises(MissingSourceError, match=f"{tmp_path / 'gone'}.*Pass llm.model="):
        module_from_checkpoint(tmp_path / "moved.ckpt")
    with pytest.raises(SystemExit, match="llm.model="):
        generate_main([f"ckpt_path={tmp_path / 'moved.ckpt'}", f"image={tmp_path / 'x.png'}"])
    again, _ = module_from_checkpoint(tmp_path / "moved.ckpt", [f"llm.model={llm_dir}"])
    assert again.generate(_val_images(module)[:6]) == ours

    # init_from the export: written as a checkpoint, it evaluates as the original
    train(make_cfg(tmp_path / "back", cache, *hub, *GEN, "trainer.max_steps=0", f"init_from={tmp_path / 'hf'}"))
    back = evaluate(str(tmp_path / "back" / "checkpoints" / "last.ckpt"))
    assert back["metrics"] == result["metrics"] and back["predictions"] == result["predictions"]


def test_misspelt_overrides_of_evaluate_export_generate_name_the_valid_keys(stage1, tmp_path):
    from blip2_train import evaluate, export, generate

    ckpt, _ = stage1
    with pytest.raises(SystemExit, match="Did you mean generation.num_beams.*num_beams, prompt"):
        evaluate.main([f"ckpt_path={ckpt}", "generation.num_beam=1"])
    with pytest.raises(SystemExit, match="Did you mean ckpt_path.*output_dir \\(this command's own\\)"):
        export.main([f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "ckpt_pth=x"])
    with pytest.raises(SystemExit, match="retrieval.k_test=many: .*could not be converted"):
        generate.main([f"ckpt_path={ckpt}", f"image={tmp_path / 'x.png'}", "retrieval.k_test=many"])
    with pytest.raises(SystemExit, match="nowhere.bin .as given on the command line., which does not exist. Pass encoder.pretrained="):
        evaluate.main([f"ckpt_path={ckpt}", f"encoder.pretrained={tmp_path / 'nowhere.bin'}"])


def test_init_from_a_checkpoint_without_its_encoder_into_a_random_encoder_names_the_fix(
        stage1, cache, open_clip_file, bert_dir, tmp_path):
    from blip2_train.training.checkpoints import load_init
    from blip2_train.training.stage1 import Stage1Module

    ckpt, _ = stage1
    module = Stage1Module(make_cfg(tmp_path, cache, *hub_overrides(open_clip_file, bert_dir), "encoder.pretrained=null"))
    with pytest.raises(ValueError, match=f"add encoder.pretrained={open_clip_file}"):
        load_init(module, ckpt)


def _fsdp_run(tmp_path, cache, run, *extra):
    cmd = [sys.executable, "-m", "blip2_train", f"run_dir={run}", f"cache_dir={cache}", *SMALL, "trainer=fsdp",
           "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("BLIP2_RUN_DIR", None)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


def test_fsdp_run_with_a_hub_llm_resumes_consolidates_and_every_reader_rebuilds_the_frozen_parts(
        stage1, cache, open_clip_file, bert_dir, opt_dir, tmp_path, capsys):
    """The sharded checkpoint keeps every weight (resume needs each key) and records what is rebuildable;
    its consolidated file leaves the frozen parts out as every single file does, and is read like one."""
    from blip2_train.consolidate import consolidate
    from blip2_train.evaluate import evaluate
    from blip2_train.generate import generate
    from blip2_train.training.checkpoints import load_init
    from blip2_train.training.modules import module_from_checkpoint
    from blip2_train.training.stage2 import Stage2Module

    stage1_ckpt, _ = stage1
    hub = [*hub_overrides(open_clip_file, bert_dir, "opt", opt_dir), *GEN, f"init_from={stage1_ckpt}"]
    run = tmp_path / "run"
    _fsdp_run(tmp_path, cache, run, *hub, "trainer.max_steps=2")
    last = run / "checkpoints" / "last.ckpt"
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["omitted_parts"] == {} and meta["rebuildable_parts"]["llm"]["source"] == str(opt_dir)
    second = _fsdp_run(tmp_path, cache, run, *hub, "trainer.max_steps=3")
    assert second["global_step"] == 3 and second["resumed_from_step"] == 2

    one = tmp_path / "one.ckpt"
    checkpoint = consolidate(last, one)
    assert sorted(checkpoint["omitted_parts"]) == ["encoder", "llm"]
    assert checkpoint["omitted_parts"]["llm"]["source"] == str(opt_dir)
    assert not [k for k in checkpoint["state_dict"] if k.startswith(("llm.", "encoder."))]
    result = evaluate(str(one))
    assert result["metrics"]["val/loss"] == pytest.approx(second["val/loss"], abs=1e-5)
    assert result["metrics"]["cider"] == pytest.approx(second["cider"], abs=1e-5)
    assert any(ch.isalpha() for ch in generate(str(one), str(_image(cache, tmp_path))))
    module, cfg = module_from_checkpoint(one)
    check_export(module, cfg, one, opt_dir, tmp_path / "hf", "opt")

    fresh = Stage2Module(make_cfg(tmp_path / "x", cache, *hub))
    load_init(fresh, one)
    report = capsys.readouterr().out
    assert "0 missing, 0 unexpected, 0 shape mismatches" in report and f"llm (the source's from {opt_dir})" in report
    assert torch.equal(fresh.language_projection.weight, module.language_projection.weight)
