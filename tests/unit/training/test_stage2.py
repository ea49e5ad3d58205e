"""Stage 2: loss parity with transformers' Blip2ForConditionalGeneration, label masking, the
prefix split, batched generation with left padding, and stage-1 -> stage-2 initialisation."""

import random

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers.modeling_outputs import BaseModelOutputWithPooling

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs
from blip2_train.data.llm_text import DecoderOnlyCollate, PrefixLMCollate, prefix_split

register_configs()
CAPTIONS = ["a large red circle at the top on a green background", "a small blue bar on a white background"]


def cfg_for(llm, cache, *extra):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(
            ["stage=2", f"llm={llm}", f"cache_dir={cache}", "qformer.num_hidden_layers=2", *extra]))


def build(llm, cache):
    from blip2_train.training.stage2 import Stage2Module

    torch.manual_seed(0)
    return Stage2Module(cfg_for(llm, cache)).eval()


class _Vision(torch.nn.Module):
    """Our frozen encoder + ln_vision standing in for transformers' vision tower."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, pixel_values, **kwargs):
        x = self.module.model.encode_image(self.module.encoder(pixel_values))
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0])


def hf_twin(module):
    """Blip2ForConditionalGeneration holding the same Q-Former, projection and LLM weights."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    llm_config = module.llm.model.config
    q = module.model.config.to_dict()
    image_token = module.llm_tokenizer.unk_token_id
    config = Blip2Config(vision_config={"hidden_size": module.encoder.width, "num_hidden_layers": 1,
                                        "num_attention_heads": 4, "intermediate_size": 64, "image_size": 16,
                                        "patch_size": 8},
                         qformer_config=q, text_config=llm_config.to_dict(),
                         num_query_tokens=module.model.num_query_tokens, image_token_id=image_token)
    hf = Blip2ForConditionalGeneration(config).eval()
    hf.vision_model = _Vision(module)
    state = hf.state_dict()
    ours = module.state_dict()
    for key in list(state):
        source = {"query_tokens": "model.query_tokens"}.get(key)
        if key.startswith("qformer."):
            source = "model." + key
        elif key.startswith("language_projection."):
            source = key
        elif key.startswith("language_model."):
            source = "llm.model." + key[len("language_model."):]
            if source not in ours:  # OPT/T5 heads sit on the outer model, not under .model
                source = "llm.model." + key.split(".", 1)[1]
        if source in ours:
            state[key] = ours[source]
    hf.load_state_dict(state, strict=False)
    return hf, image_token


@pytest.mark.parametrize("llm", ["tiny_opt", "tiny_t5"])
def test_stage2_loss_equals_transformers_blip2(llm, cache):
    module = build(llm, cache)
    hf, image_token = hf_twin(module)
    images = torch.randn(2, 3, 64, 64)
    train_collate, _ = module.text_collates()
    batch = train_collate(CAPTIONS)
    with torch.no_grad():
        ours = module.lm_loss(module.visual_prompts(images), batch)
        q = module.model.num_query_tokens
        placeholder = torch.full((2, q), image_token)
        ids = torch.cat([placeholder, batch["llm_input_ids"]], 1)
        mask = torch.cat([torch.ones(2, q, dtype=torch.long), batch["llm_attention_mask"]], 1)
        if llm == "tiny_opt":
            labels = torch.cat([torch.full((2, q), -100), batch["llm_labels"]], 1)
            theirs = hf(pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            theirs = hf(pixel_values=images, input_ids=ids, attention_mask=mask, labels=batch["llm_labels"],
                        decoder_attention_mask=batch["llm_decoder_attention_mask"]).loss
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert ours.item() > 1.0  # a real cross-entropy of a random model


def test_decoder_only_labels_token_by_token(cache):
    """The targets are the caption and its "\\n", from the caption's first token: the prompt "a photo of " tokenised
    alone ends in a lone "Ġ" that the joined text merges into the caption's first word ("Ġa")."""
    module = build("tiny_opt", cache)
    tok = module.llm_tokenizer
    collate = DecoderOnlyCollate(tok, "a photo of ", 48)
    captions = ["a red circle", "a large blue square at the top"]
    batch = collate(captions)
    ids, labels, mask = batch["llm_input_ids"], batch["llm_labels"], batch["llm_attention_mask"]
    prompt_len = len(tok("a photo of")["input_ids"])  # BOS + "a photo of", no trailing space
    assert len(tok("a photo of ")["input_ids"]) == prompt_len + 1  # the lone trailing-space token
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    assert ids[0, 0] == tok.bos_token_id
    for row, caption in enumerate(captions):
        length = int(mask[row].sum())
        for t in range(ids.shape[1]):
            if t < prompt_len or t >= length:
                assert labels[row, t] == -100  # BOS, prompt, padding
            else:
                assert labels[row, t] == ids[row, t]  # caption and the "\n" end token
        assert tok.decode(ids[row, :prompt_len], skip_special_tokens=True) == "a photo of"
        assert tok.decode(labels[row, labels[row] != -100]) == " " + caption + "\n"
        assert ids[row, length - 1] == newline and labels[row, length - 1] == newline
    assert (ids[0, int(mask[0].sum()):] == tok.pad_token_id).all()  # right padding
    # without a prompt only BOS is masked
    plain = DecoderOnlyCollate(tok, "", 48)(captions)
    assert (plain["llm_labels"][:, 0] == -100).all() and (plain["llm_labels"][:, 1] == plain["llm_input_ids"][:, 1]).all()
    # llm.prompt_mask=lavis: LAVIS's count (the prompt tokenised alone) also masks the caption's first token
    lavis = DecoderOnlyCollate(tok, "a photo of ", 48, "lavis")(captions)["llm_labels"]
    assert torch.equal(lavis[:, : prompt_len + 1], torch.full((2, prompt_len + 1), -100))
    assert (labels[:, prompt_len] != -100).all()  # ... which "joined" keeps as a target
    assert torch.equal(lavis[:, prompt_len + 1:], labels[:, prompt_len + 1:])
    with pytest.raises(ValueError, match="llm.prompt_mask='lavish' is not valid; choose one of: joined, lavis"):
        DecoderOnlyCollate(tok, "a photo of ", 48, "lavish")


def test_prefix_split_bounds_and_seed():
    caption = "a large red circle at the top on a green background"
    words = caption.split()
    for seed in range(50):
        prefix, suffix = prefix_split(caption, random.Random(seed))
        k = len(prefix.split())
        assert 1 <= k <= len(words) // 2 and (prefix + " " + suffix).split() == words
    a = [prefix_split(caption, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert prefix_split("dog", random.Random(0)) == ("", "dog")


def test_prefix_lm_collate_targets(cache):
    module = build("tiny_t5", cache)
    collate = PrefixLMCollate(module.llm_tokenizer, 32, seed=3)
    batch = collate(CAPTIONS)
    again = PrefixLMCollate(module.llm_tokenizer, 32, seed=3)(CAPTIONS)
    assert torch.equal(batch["llm_labels"], again["llm_labels"])
    eos = module.llm_tokenizer.eos_token_id
    for row in range(2):
        valid = batch["llm_labels"][row][batch["llm_labels"][row] != -100]
        assert valid[-1] == eos  # the suffix ends with </s>
    evaluation = PrefixLMCollate(module.llm_tokenizer, 32, seed=3, deterministic=True)
    assert torch.equal(evaluation(CAPTIONS)["llm_labels"], evaluation(CAPTIONS)["llm_labels"])


@pytest.mark.parametrize("llm", ["tiny_opt", "tiny_t5"])
def test_batched_generation_with_left_padding_matches_single(llm, cache):
    module = build(llm, cache)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    prompts = ["a photo of", "question what color is the circle short answer", "a"]
    batched = module.generate(images, prompts, num_beams=1, max_new_tokens=6, min_new_tokens=2)
    singles = [module.generate(images[i:i + 1], [prompts[i]], num_beams=1, max_new_tokens=6,
                               min_new_tokens=2)[0] for i in range(3)]
    assert batched == singles


def test_stage1_checkpoint_initialises_the_query_path(tmp_path, cache, capsys):
    from blip2_train.training.checkpoints import load_init
    from blip2_train.training.stage1 import Stage1Module

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg1 = compose("config", overrides=[f"cache_dir={cache}", "qformer.num_hidden_layers=2"])
    torch.manual_seed(5)
    stage1 = Stage1Module(cfg1)
    ckpt = tmp_path / "s1.ckpt"
    torch.save({"state_dict": stage1.state_dict()}, ckpt)
    stage2 = build("tiny_opt", cache)
    report = load_init(stage2, ckpt)
    out = capsys.readouterr().out
    assert "model.qformer" in out and "model.query_tokens" in out and "model.ln_vision" in out
    assert "model.qformer.encoder.layer.0.crossattention.attention.key.weight" in report["matched"]
    assert not [k for k in report["missing"] if k.startswith("model.")]
    assert torch.equal(stage2.model.query_tokens, stage1.model.query_tokens)


@pytest.mark.parametrize("llm", ["tiny_opt", "tiny_t5"])
def test_stage2_run_evaluate_and_generate(llm, tmp_path, cache):
    """A short stage-2 run writes val/loss, cider, bleu4; evaluate captions every val image."""
    import json

    from blip2_train.evaluate import evaluate
    from blip2_train.generate import generate
    from blip2_train.training.fit import train

    overrides = [f"run_dir={tmp_path / 'run'}", "trainer=cpu", "trainer.max_steps=2",
                 "trainer.enable_progress_bar=false", "logger=none", "data.batch_size=8", "data.num_workers=0",
                 "data.synthetic.num_train=32", "data.synthetic.num_val=12", "data.synthetic.samples_per_shard=16",
                 "data.samples_per_epoch=32", "generation.num_beams=2", "generation.max_new_tokens=8",
                 "generation.min_new_tokens=2"]
    metrics = train(cfg_for(llm, cache, *overrides))
    assert {"val/loss", "cider", "bleu4", "global_step"} <= set(metrics) and metrics["global_step"] == 2
    assert 0.0 < metrics["val/loss"] < 20.0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    result = evaluate(str(ckpt), ["generation.num_beams=1"], output=str(tmp_path / "eval.json"))
    written = json.loads((tmp_path / "eval.json").read_text())
    assert len(written["predictions"]) == 12 and written["metrics"]["val/loss"] == pytest.approx(
        metrics["val/loss"], rel=1e-5)
    assert result["metrics"]["val/loss"] == written["metrics"]["val/loss"]
    image = next((cache / "synthetic").glob("*/val/*.tar"))
    import tarfile

    with tarfile.open(image) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        (tmp_path / "x.png").write_bytes(tar.extractfile(member).read())
    caption = generate(str(ckpt), str(tmp_path / "x.png"), overrides=["generation.num_beams=1"])
    # generation.min_new_tokens=2: at least two words of the synthetic vocabulary, never an empty string
    assert isinstance(caption, str) and len(caption.split()) >= 1 and caption.strip() == caption, repr(caption)
