"""VQA: the VQAv2 metric on hand-computed cases, synthetic questions, the data recipes, the collate,
the question-aware Q-Former path (against transformers' InstructBLIP Q-Former), training and zero-shot
evaluation of stage-2 checkpoints."""

import io
import json
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs
from blip2_train.metrics.vqa import majority_baseline, normalize_answer, vqa_accuracy, vqa_score

register_configs()
REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------- metric
@pytest.mark.parametrize("raw, expected", [
    ("two", "2"), ("Two", "2"), ("none", "0"), ("the dog.", "dog"), ("A dog", "dog"), ("an apple", "apple"),
    ("dont", "don't"), ("isnt it", "isn't it"), ("Yes!", "yes"), ("1,000", "1000"), ("3.5", "3.5"),
    ("red, white", "red white"), ("t-shirt", "t shirt"), ("10:30", "10:30"), ("  the   Top  ", "top"),
    ("people's", "people's"),
])
def test_normalize_answer_follows_the_vqa_evaluation_rules(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("matches, expected", [
    # 10 answers, m match: leaving out one of the m leaves m - 1 matches, leaving out another leaves m
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
    (4, 1.0), (10, 1.0),
])
def test_vqa_accuracy_is_the_leave_one_out_average(matches, expected):
    answers = ["dog"] * matches + [f"cat{i}" for i in range(10 - matches)]
    assert vqa_accuracy("dog", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_both_sides_and_scores_a_corpus():
    # "two" / "2" / "Two." are one answer after normalisation: 3 of 10 -> 0.9
    assert vqa_accuracy("2", ["two", "2", "Two.", *["3"] * 7]) == pytest.approx(0.9)
    assert vqa_accuracy("The dog.", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("yes", ["yes"]) == 1.0 and vqa_accuracy("no", ["yes"]) == 0.0  # one annotator
    # 5 answers (not VQAv2's 10): 1 match -> (0 + 4 * 1/3) / 5
    assert vqa_accuracy("a", ["a", "b", "c", "d", "e"]) == pytest.approx(4 / 15)
    assert vqa_score({1: "dog", 2: "cat"}, {1: ["dog"] * 10, 2: ["cat"] + ["x"] * 9}) == pytest.approx((1 + 0.3) / 2)
    with pytest.raises(ValueError, match="no annotator answers"):
        vqa_score({1: "dog"}, {})


def test_majority_baseline_answers_the_most_frequent_training_answer():
    train = [["red"] * 10, ["red"] * 10, ["2"] * 10]
    val = {"a": ["red"] * 10, "b": ["2"] * 3 + ["3"] * 7}
    assert majority_baseline(train, val) == pytest.approx((1.0 + 0.0) / 2)  # always "red"
    # per question type: colour questions answer "red", count questions "2" (3 of 10 -> 0.9)
    assert majority_baseline(train, val, groups={"a": "color", "b": "count"},
                             train_groups=["color", "color", "count"]) == pytest.approx((1.0 + 0.9) / 2)


# ------------------------------------------------------------------------------ synthetic QA
def _components(image: Image.Image, rgb) -> int:
    """4-connected regions of exactly ``rgb``."""
    import numpy as np

    todo = {tuple(p) for p in np.argwhere((np.asarray(image) == rgb).all(-1)).tolist()}
    count = 0
    while todo:
        count += 1
        stack = [todo.pop()]
        while stack:
            y, x = stack.pop()
            for near in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if near in todo:
                    todo.remove(near)
                    stack.append(near)
    return count


def test_synthetic_questions_have_the_answers_the_images_show():
    from blip2_train.data.synthetic import COLORS
    from blip2_train.data.synthetic_qa import QUESTIONS, render_qa_sample

    rng = random.Random(3)
    types, agree = Counter(), []
    for _ in range(100):
        image, record = render_qa_sample(rng, 64)
        assert _components(image, COLORS[record["color"]]) == record["count"]  # 1-4 separate copies
        assert image.getpixel((0, 0)) == COLORS[record["background"]]
        assert record["question"] == QUESTIONS[record["question_type"]] and len(record["answers"]) == 10
        truth = {"color": record["color"], "background": record["background"], "shape": record["shape"],
                 "where": record["position"], "count": str(record["count"])}[record["question_type"]]
        assert record["answer"] == truth
        agree.append(sum(normalize_answer(a) == truth for a in record["answers"]) / 10)
        types[record["question_type"]] += 1
    assert set(types) == set(QUESTIONS)
    assert 0.72 < sum(agree) / len(agree) < 0.88  # agreement 0.8: most annotators give the truth
    assert sum(a < 1 for a in agree) > 50  # and most questions carry some disagreement


def test_synthetic_qa_shards_decode_into_questions_and_answers(tmp_path):
    import webdataset as wds

    from blip2_train.data.stages import SkipCounter
    from blip2_train.data.synthetic_qa import write_synthetic_qa_shards
    from blip2_train.data.transforms import eval_transform
    from blip2_train.data.vqa import DecodeVQASamples
    from blip2_train.data.webdataset import expand_urls

    manifest = write_synthetic_qa_shards(tmp_path / "qa", num_train=10, num_val=4, image_size=32,
                                         samples_per_shard=4)
    assert manifest["train"] == {"samples": 10, "shards": 3} and manifest["params"]["kind"] == "qa"
    counter = SkipCounter()
    pipeline = wds.DataPipeline(wds.SimpleShardList(expand_urls(str(tmp_path / "qa" / "val"))),
                                wds.tarfile_to_samples(), DecodeVQASamples(eval_transform(32), 50, counter, True))
    samples = list(pipeline)
    assert len(samples) == 4 and counter.good == 4
    assert [s["key"] for s in samples] == ["10", "11", "12", "13"]  # question_id names a prediction
    assert samples[0]["image"].shape == (3, 32, 32) and len(samples[0]["answers"]) == 10


def test_vqa_decode_skips_samples_without_question_or_answers(tmp_path):
    from blip2_train.data.stages import SkipCounter
    from blip2_train.data.vqa import DecodeVQASamples, read_question

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    raw = [{"__key__": "a", "__url__": "u", "png": png.getvalue(), "json": b'{"question": "q?", "answers": ["x"]}'},
           {"__key__": "b", "__url__": "u", "png": png.getvalue(), "json": b'{"question": "q?"}'},
           {"__key__": "c", "__url__": "u", "png": png.getvalue(), "txt": b"a caption"}]
    counter = SkipCounter()
    out = list(DecodeVQASamples(lambda im: torch.zeros(3, 8, 8), 50, counter, False)(iter(raw)))
    assert [s["key"] for s in out] == ["a"] and counter.since_batch == 2
    assert counter.last_reason.startswith("no json")
    assert "json has no answers" in read_question(raw[1]["json"])


# ------------------------------------------------------------------------------------ recipes
def _fake_vqav2(tmp_path):
    """COCO layout with 3 images; 4 questions, 3 annotated (10 answers each)."""
    root = tmp_path / "coco" / "val2014"
    root.mkdir(parents=True)
    for image_id in (7, 8, 9):
        Image.new("RGB", (20, 16), (image_id * 20, 0, 0)).save(root / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 7, "question": "What color is it?", "question_id": 70},
        {"image_id": 7, "question": "How many?", "question_id": 71},
        {"image_id": 8, "question": "Is it a cat?", "question_id": 80},
        {"image_id": 9, "question": "Unannotated?", "question_id": 90}]}
    answers = {70: ["red"] * 9 + ["pink"], 71: ["two"] * 5 + ["2"] * 5, 80: ["no"] * 10}
    annotations = {"annotations": [
        {"question_id": q, "image_id": q // 10, "answer_type": "other", "question_type": "what",
         "answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(ans)]}
        for q, ans in answers.items()]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return answers


def test_vqav2_recipe_writes_question_shards_with_all_answers(tmp_path):
    answers = _fake_vqav2(tmp_path)
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, str(REPO / "data_recipes" / "vqav2.py"), str(tmp_path / "q.json"),
                           str(tmp_path / "a.json"), str(tmp_path / "coco"), str(out), "--samples-per-shard", "2",
                           "--workers", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 3 and manifest["shards"] == 2 and manifest["unannotated_questions"] == 1
    metas = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    metas[meta["question_id"]] = meta
    assert {q: m["answers"] for q, m in metas.items()} == answers
    assert metas[71]["question"] == "How many?" and metas[71]["image_id"] == 7
    assert metas[80]["question_type"] == "what"


def test_vqav2_recipe_names_a_wrong_file(tmp_path):
    _fake_vqav2(tmp_path)
    done = subprocess.run([sys.executable, str(REPO / "data_recipes" / "vqav2.py"), str(tmp_path / "a.json"),
                           str(tmp_path / "a.json"), str(tmp_path / "coco"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0 and "is not a VQAv2 questions file" in done.stderr


def test_jsonl_question_rows_become_vqa_shards(tmp_path):
    from data_recipes.jsonl_to_shards import jsonl_to_shards

    Image.new("RGB", (10, 10)).save(tmp_path / "x.png")
    rows = [{"image": "x.png", "question": "what is it?", "answers": ["a box", "box"], "question_id": "q1"},
            {"image": "x.png", "question": "is it red?", "answer": "yes"},
            {"image": "x.png", "question": "empty?", "answers": [" "]},
            {"image": "x.png", "caption": "a plain caption"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    manifest = jsonl_to_shards(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), str(tmp_path), workers=1,
                               progress=False)
    assert manifest["samples"] == 3 and "no answers" in manifest["skipped"][0]["reason"]
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert json.loads(files["000000000.json"])["answers"] == ["a box", "box"]
    assert json.loads(files["000000000.json"])["question_id"] == "q1" and files["000000000.txt"] == b"what is it?"
    assert json.loads(files["000000001.json"])["answers"] == ["yes"]
    assert "question" not in json.loads(files["000000003.json"])


# ------------------------------------------------------------------------------------ collate

def test_vqa_collate_masks_the_prompt_and_samples_answers_by_count(cache):
    from blip2_train.data.vqa import VQACollate
    from blip2_train.models.llm import tiny_opt_tokenizer, tiny_t5_tokenizer

    opt = tiny_opt_tokenizer(cache)
    samples = [{"question": "what color is the shape?", "answers": ["Red."] * 7 + ["blue"] * 3},
               {"question": "how many shapes are there?", "answers": ["two"] * 10}]
    collate = VQACollate(opt, True, "Question: {} Short answer:", 64, deterministic=True)
    batch = collate(samples)
    for row, answer in zip(range(2), ["red", "2"]):
        targets = batch["llm_labels"][row][batch["llm_labels"][row] != -100]
        assert opt.decode(targets) == f" {answer}\n"  # the answer and its end token only
        text = opt.decode(batch["llm_input_ids"][row][batch["llm_attention_mask"][row] == 1],
                          skip_special_tokens=True)
        assert text == f"Question: {samples[row]['question']} Short answer: {answer}\n"
    drawn = Counter()
    sampler = VQACollate(opt, True, "Question: {} Short answer:", 64, seed=1)
    for _ in range(400):
        drawn.update(sampler.targets(samples[:1] * 5))
    assert drawn["red"] / 2000 == pytest.approx(0.7, abs=0.035)  # each answer with probability count / 10
    assert set(drawn) == {"red", "blue"}
    t5 = tiny_t5_tokenizer(cache)
    batch = VQACollate(t5, False, "Question: {} Short answer:", 64, deterministic=True)(samples)
    assert t5.decode(batch["llm_labels"][0][batch["llm_labels"][0] != -100]) == "red</s>"
    assert "what color is the shape?" in t5.decode(batch["llm_input_ids"][0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="has no {} for the question"):
        VQACollate(opt, True, "Question: Short answer:", 64)


def test_tiny_llm_qa_pretraining_answers_from_a_description_before_bos(cache):
    """The tiny LLM's QA pretraining (llm.tiny.pretrain_qa) puts a scene description where the visual
    prompts will be (before BOS) and targets the answer the description gives, and only it."""
    from blip2_train.models.llm import tiny_opt_tokenizer
    from blip2_train.training.tiny_llm import qa_reading_batch

    tok = tiny_opt_tokenizer(cache)
    batch = qa_reading_batch(tok, True, "Question: {} Short answer:", 40, random.Random(0))
    kinds = Counter()
    for ids, mask, labels in zip(batch["llm_input_ids"], batch["llm_attention_mask"], batch["llm_labels"]):
        ids = ids[mask == 1]
        bos = int((ids == tok.bos_token_id).nonzero()[0])
        description, rest = tok.decode(ids[:bos]), tok.decode(ids[bos + 1:])
        answer = tok.decode(labels[labels != -100])
        assert bos > 0 and rest.startswith("Question: ") and rest.endswith(answer) and answer.endswith("\n")
        words = description.split()
        answer = answer.strip()
        if rest.startswith("Question: how many"):
            kinds["count"] += 1
            assert normalize_answer(words[0]) == answer  # "three red circles ..." -> "3"
        else:
            kinds["other"] += 1
            assert answer in words or answer + "s" in words or answer + "es" in words
    assert kinds["count"] and kinds["other"]


# --------------------------------------------------------------------------------------- model
def vqa_cfg(cache, *extra):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(
            ["stage=2", "llm=tiny_opt", "stage.task=vqa", "data=synthetic_qa", f"cache_dir={cache}",
             "qformer.num_hidden_layers=2", "llm.tiny.pretrain_steps=0", *extra]))  # no learning measured here


def test_task_and_data_are_validated_with_the_valid_values_named(cache):
    from blip2_train.config import validate

    with pytest.raises(ValueError, match="stage.task='qa' is not valid; choose one of: caption, vqa"):
        validate(vqa_cfg(cache, "stage.task=qa"))
    with pytest.raises(ValueError, match="needs question-answer data: use data=synthetic_qa"):
        validate(vqa_cfg(cache, "data=synthetic"))
    with pytest.raises(ValueError, match="stage.task=vqa needs stage=2"):
        validate(vqa_cfg(cache, "stage=1"))
    with pytest.raises(ValueError, match="holds questions, not captions"):
        validate(vqa_cfg(cache, "stage.task=caption"))
    with pytest.raises(ValueError, match="has no {} for the question"):
        validate(vqa_cfg(cache, "vqa.prompt=Answer:"))
    with pytest.raises(ValueError, match=r"data.feature_cache=/f serves caption samples only.*unset data.feature_cache"):
        validate(vqa_cfg(cache, "data.feature_cache=/f"))
    validate(vqa_cfg(cache))


def test_question_aware_queries_match_transformers_instructblip_qformer(cache):
    """The question tokens share self-attention with the queries: our query outputs equal transformers'
    InstructBlipQFormerModel (the InstructBLIP Q-Former) given the same weights, and change with the
    question; with vqa.qformer_text_input=false the question never reaches the Q-Former."""
    from transformers import InstructBlipQFormerConfig
    from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerModel

    from blip2_train.models.qformer import itm_mask
    from blip2_train.training.modules import build_module

    torch.manual_seed(0)
    module = build_module(vqa_cfg(cache)).eval()
    assert not hasattr(module.model, "itm_head") and not hasattr(module.model, "temp")  # no stage-1 heads
    q = module.model.config.to_dict()
    hf = InstructBlipQFormerModel(InstructBlipQFormerConfig(**{k: v for k, v in q.items()
                                                              if k not in ("use_qformer_text_input",)})).eval()
    ours = module.model.state_dict()
    state = {}
    for key in hf.state_dict():
        source = "qformer.layernorm." + key.split(".")[-1] if key.startswith("embeddings.layernorm") else (
            key if key.startswith("embeddings.") else "qformer." + key)
        state[key] = ours[source]
    hf.load_state_dict(state, strict=False)
    tok = module.tokenizer
    enc = tok(["what color is the shape?", "how many shapes are there?"], padding="longest", return_tensors="pt")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        prompts = module.question_prompts(images, enc["input_ids"], enc["attention_mask"])  # [2, Q, D]
        image_embeds = module.model.encode_image(module.encoder(images))
        num_queries = module.model.num_query_tokens
        query_mask = torch.ones(2, num_queries, dtype=torch.long)
        hidden = hf(input_ids=enc["input_ids"], query_embeds=module.model.query_tokens.expand(2, -1, -1),
                    attention_mask=torch.cat([query_mask, enc["attention_mask"]], 1),
                    encoder_hidden_states=image_embeds).last_hidden_state[:, :num_queries]
        torch.testing.assert_close(prompts, module.language_projection(hidden), rtol=1e-4, atol=1e-5)
        swapped = module.question_prompts(images, enc["input_ids"].flip(0), enc["attention_mask"].flip(0))
        assert (swapped[0] - prompts[0]).abs().max() > 1e-3  # another question, other queries
        # the ITM mask is what lets text reach the queries
        assert itm_mask(enc["attention_mask"], num_queries).all(dim=-2).shape == (2, 1, num_queries + enc[
            "input_ids"].shape[1])
    zero_shot = build_module(vqa_cfg(cache, "vqa.qformer_text_input=false"))
    assert zero_shot.model.query_only and zero_shot.tokenizer is None


@pytest.mark.parametrize("llm", ["tiny_opt", "tiny_t5"])
def test_vqa_run_evaluates_and_a_caption_checkpoint_answers_zero_shot(llm, tmp_path, cache):
    """A short VQA run logs val/vqa_accuracy; evaluate reproduces it; a stage-2 caption checkpoint
    evaluates on questions through evaluate (stage.task=vqa) with the question in the LLM prompt only."""
    from blip2_train.evaluate import evaluate
    from blip2_train.training.fit import train

    small = ["trainer=cpu", "trainer.max_steps=2", "trainer.enable_progress_bar=false", "logger=none",
             "data.batch_size=8", "data.num_workers=0", "data.synthetic.num_train=16", "data.synthetic.num_val=8",
             "data.synthetic.samples_per_shard=8", "data.samples_per_epoch=16", "vqa.num_beams=2",
             "vqa.max_new_tokens=3", f"llm={llm}"]
    metrics = train(vqa_cfg(cache, f"run_dir={tmp_path / 'vqa'}", *small))
    assert {"val/loss", "val/vqa_accuracy"} <= set(metrics) and 0.0 < metrics["val/loss"] < 100.0  # random LLMs
    assert 0.0 <= metrics["val/vqa_accuracy"] <= 1.0
    result = evaluate(str(tmp_path / "vqa" / "checkpoints" / "last.ckpt"), [])
    assert len(result["predictions"]) == 8
    assert result["metrics"]["val/vqa_accuracy"] == pytest.approx(metrics["val/vqa_accuracy"])
    assert result["metrics"]["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    # a caption-trained stage-2 checkpoint (query-only Q-Former) answers zero-shot
    caption_run = tmp_path / "caption"
    train(vqa_cfg(cache, f"run_dir={caption_run}", *small, "stage.task=caption", "data=synthetic",
                  "generation.num_beams=1", "generation.max_new_tokens=3", "generation.min_new_tokens=1"))
    ckpt = str(caption_run / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit, match="needs question-answer data"):
        evaluate(ckpt, ["stage.task=vqa"])
    with pytest.raises(SystemExit, match="has no text path to read the question"):
        evaluate(ckpt, ["stage.task=vqa", "data.synthetic.kind=qa", "vqa.qformer_text_input=true"])
    zero = evaluate(ckpt, ["stage.task=vqa", "data.synthetic.kind=qa", "vqa.num_beams=1",
                           'vqa.prompt="Question: {} Answer:"'])  # YAML-quoted: {} is a mapping
    assert len(zero["predictions"]) == 8 and 0.0 <= zero["metrics"]["val/vqa_accuracy"] <= 1.0
    assert all(isinstance(a, str) for a in zero["predictions"].values())


# ------------------------------------------------------------------------------------ presets
def test_vqa_presets_compose_validate_and_build(cache):
    from blip2_train.config import validate
    from blip2_train.models.qformer import QFormer, num_parameters
    from blip2_train.training.stage2_vqa import STAGE1_HEADS

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        tiny = compose("config", overrides=["experiment=blip2_vqa_tiny", f"cache_dir={cache}"])
        paper = compose("config", overrides=["experiment=blip2_vitg_opt27_vqa_from_stage2"])
        with_init = compose("config", overrides=["experiment=blip2_vitg_opt27_vqa_from_stage2", "init_from=s2.ckpt"])
    validate(tiny)
    assert tiny.stage.task == "vqa" and tiny.data.synthetic.kind == "qa" and tiny.llm.name == "tiny_opt"
    assert tiny.vqa.prompt == "Question: {} Short answer:" and tiny.vqa.qformer_text_input
    with pytest.raises(ValueError, match="init_from="):
        validate(paper)
    validate(with_init)
    assert with_init.optim.lr == 1e-5 and with_init.optim.warmup_steps == 1000 and with_init.vqa.num_beams == 5
    assert [s.name for s in with_init.data.sources] == ["vqav2", "vg_qa"] and with_init.llm.model == "facebook/opt-2.7b"
    assert with_init.vqa.prompt == "Question: {} Answer:" and with_init.data.global_batch_size == 128
    # the paper's VQA fine-tuning trains the ViT at 490 px with layer-wise lr decay 0.95 (built on meta in test_finetuning)
    assert not with_init.encoder.freeze and with_init.encoder.image_size == 490 and with_init.optim.layer_decay == 0.95
    # the paper-size Q-Former with its text path (bert-base sizes), on the meta device: 188M in the paper
    with torch.device("meta"):
        qformer = QFormer(with_init.qformer, vision_width=1408, vocab_size=30523, query_only=False)
    for name in STAGE1_HEADS:
        delattr(qformer, name)
    count = num_parameters(qformer)
    print("paper-size VQA Q-Former parameters", count)
    assert 180e6 < count < 190e6


# --------------------------------------------------------------------------------- done-when
def _shard_records(directory):
    records = []
    for shard in sorted(Path(directory).glob("*.tar")):
        with tarfile.open(shard) as tar:
            records += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return records


VQA_MARGIN = 0.12  # over the per-type majority answer (0.311 on this set); measured +0.16 (0.471, docs/vqa.md)


@pytest.mark.slow  # 10-12 min on 2 shared cores: 6 of them the tiny LLM's reading pretraining, then 400 steps
def test_tiny_vqa_fine_tuning_beats_the_majority_answer_baselines(tmp_path):
    """experiment=blip2_vqa_tiny, as its header runs it: VQA accuracy on 200 held-out synthetic questions at
    least VQA_MARGIN above answering each question type's most frequent training answer, and far above the
    single most frequent answer; evaluate reproduces the run's accuracy from its checkpoint, and the answers
    of the type the model must read from the image alone (background) beat their majority by 0.3, and those
    about the shape's colour (a few of the 256 patches at 128 px) by 0.08."""
    from blip2_train.evaluate import evaluate
    from blip2_train.training.fit import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=blip2_vqa_tiny", f"run_dir={tmp_path / 'run'}",
                                           f"cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false"])
    metrics = train(cfg)
    result = evaluate(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), [f"cache_dir={tmp_path / 'cache'}"])
    root = next((tmp_path / "cache" / "synthetic").glob("qa-*"))
    train_records, val_records = _shard_records(root / "train"), _shard_records(root / "val")
    val = {r["question_id"]: r["answers"] for r in val_records}
    types = {r["question_id"]: r["question_type"] for r in val_records}
    train_types = [r["question_type"] for r in train_records]
    overall = majority_baseline([r["answers"] for r in train_records], val)
    per_type = majority_baseline([r["answers"] for r in train_records], val, groups=types, train_groups=train_types)
    predictions = {int(k): v for k, v in result["predictions"].items()}
    accuracy, by_type, majority_by_type = {}, {}, {}
    for kind in sorted(set(types.values())):
        ids = [q for q in val if types[q] == kind]
        by_type[kind] = vqa_score({q: predictions[q] for q in ids}, val)
        majority_by_type[kind] = majority_baseline(
            [r["answers"] for r in train_records], {q: val[q] for q in ids}, groups=types, train_groups=train_types)
        accuracy[kind] = f"{by_type[kind]:.2f} (majority {majority_by_type[kind]:.2f})"
    print(f"vqa accuracy {metrics['val/vqa_accuracy']:.3f}, majority {overall:.3f}, per-type majority {per_type:.3f}; "
          f"per type {accuracy}")
    assert result["metrics"]["val/vqa_accuracy"] == pytest.approx(metrics["val/vqa_accuracy"], abs=1e-6)
    assert len(predictions) == len(val) == 200
    assert metrics["val/vqa_accuracy"] >= per_type + VQA_MARGIN and per_type > overall
    assert by_type["background"] >= majority_by_type["background"] + 0.3
    # measured 0.32 against 0.15; the 64-px grid of the fifth pass got 0.22 and fails this (docs/vqa.md)
    assert by_type["color"] >= majority_by_type["color"] + 0.08


# ------------------------------------------------------------------------------------- export
def test_question_aware_vqa_model_exports_to_instructblip_with_our_greedy_answers(tmp_path, cache):
    """A VQA model whose Q-Former reads the question exports to transformers'
    InstructBlipForConditionalGeneration: the question as qformer_input_ids, the vqa.prompt-formatted
    question as the LLM text, and greedy generation answers as ours does, logits equal."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from blip2_train.data.vqa import format_prompt
    from blip2_train.interop.hf_export import export_module
    from blip2_train.training.modules import build_module

    torch.manual_seed(0)
    module = build_module(vqa_cfg(cache, "vqa.num_beams=1", "vqa.max_new_tokens=4")).eval()
    for p in module.parameters():  # a random Q-Former and projection: make the visual prompts matter
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.05)
    export_module(module, tmp_path / "hf")
    hf = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = InstructBlipProcessor.from_pretrained(tmp_path / "hf")
    hf.vision_model.post_layernorm.eps = module.model.ln_vision.eps  # the one known export difference
    images = torch.randn(4, 3, 64, 64)
    questions = ["what color is the shape?", "how many shapes are there?", "where is the shape?",
                 "what shape is it?"]
    with torch.no_grad():
        ours = module.answer(images, questions)
        processor.tokenizer.padding_side = "left"
        inputs = processor(images=[Image.new("RGB", (64, 64))] * 4,
                           text=[format_prompt(module.cfg.vqa.prompt, q) for q in questions],
                           padding="longest", return_tensors="pt")
        q = processor.qformer_tokenizer(questions, padding="longest", return_tensors="pt")  # the bare question
        inputs.update(pixel_values=images, qformer_input_ids=q["input_ids"], qformer_attention_mask=q["attention_mask"])
        out = hf.generate(**inputs, generation_config=hf.generation_config)[:, inputs["input_ids"].shape[1]:]
        theirs = [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
        ours_prompts = module.question_prompts(images, q["input_ids"], q["attention_mask"])
        theirs_prompts = hf.get_image_features(images, q["input_ids"], q["attention_mask"]).pooler_output
    print("answers", ours, theirs)
    torch.testing.assert_close(theirs_prompts, ours_prompts, rtol=1e-4, atol=1e-5)
    assert theirs == ours and len(set(ours)) > 1


def test_vqa_exports_refuse_what_does_not_fit_and_query_only_goes_to_blip2(tmp_path, cache):
    from transformers import Blip2ForConditionalGeneration

    from blip2_train.interop.hf_export import export_module
    from blip2_train.training.modules import build_module

    t5 = build_module(vqa_cfg(cache, "llm=tiny_t5"))
    with pytest.raises(ValueError, match="only decoder-only LLMs export with parity"):
        export_module(t5, tmp_path / "t5")
    query_only = build_module(vqa_cfg(cache, "vqa.qformer_text_input=false", "vqa.max_new_tokens=3"))
    export_module(query_only, tmp_path / "blip2")
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip2")
    assert hf.generation_config.max_new_tokens == 3  # the run's vqa.* answer settings
    from blip2_train.interop import META_FILE

    assert json.loads((tmp_path / "blip2" / META_FILE).read_text())["prompt"] == "Question: {} Short answer:"
