"""Pre-training of a tiny random LLM on the synthetic caption language (and synthetic questions) before
it is frozen: models/llm.py builds the tiny LLM, :func:`pretrain_from_config` is the hook its builder calls.

It lives here, not in models/, because it reads the synthetic corpora and collates of data/.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def pretrain_from_config(model: nn.Module, tokenizer, llm_cfg, cache_dir) -> None:
    """The ``pretrain`` argument of ``models.llm.build_llm``: :func:`pretrain_tiny_llm` with the
    ``llm.tiny`` settings, cached in ``cache_dir``."""
    tiny = dict(llm_cfg.tiny)
    pretrain_tiny_llm(model, tokenizer, llm_cfg.kind, int(tiny.get("pretrain_steps", 0)), cache_dir,
                      qa_prompt=tiny.get("pretrain_qa"), corpus=str(tiny.get("corpus", "shapes")))


def pretrain_tiny_llm(model: nn.Module, tokenizer, kind: str, steps: int, cache_dir, seed: int = 0,
                      qa_prompt: str | None = None, corpus: str = "shapes") -> None:
    """Teach a tiny random LLM the synthetic caption language (text only) before it is frozen.

    A frozen *random* LLM predicts near-uniform tokens whatever the visual prompts say, so
    stage 2 would have nothing to steer; a real BLIP-2 LLM knows language. ``corpus`` (``llm.tiny.corpus``)
    is the caption language: ``shapes`` (data/synthetic.py) or ``scenes`` (data/synthetic_scenes.py,
    for data=synthetic_scenes). The result is cached
    in ``cache_dir`` (keyed by sizes, steps and seed), so every run gets the same frozen LLM.

    ``qa_prompt`` (``llm.tiny.pretrain_qa``, e.g. "Question: {} Short answer:"): half of each batch is
    then reading comprehension in that prompt: a scene described in words, then BOS, then a question
    about it, and the answer the description gives (text only, no image; ``qa_reading_texts``). So the
    LLM knows the answer format, stops after the answer, and, as a real LLM does, answers from what
    comes before the question. Without the description (answers drawn at random, as before) the LLM
    learns that nothing in its context predicts the answer: frozen, it then ignores the visual prompts
    in front of it, and VQA fine-tuning cannot get past answering each question type's prior (docs/vqa.md).
    """
    import hashlib
    import random

    from blip2_train.data.llm_text import DecoderOnlyCollate, PrefixLMCollate
    if corpus == "scenes":
        from blip2_train.data.synthetic_scenes import random_scene_caption as random_caption
    elif corpus == "shapes":
        from blip2_train.data.synthetic import random_caption
    else:
        raise ValueError(f"llm.tiny.corpus={corpus!r} is not valid; choose one of: shapes, scenes")

    qa_key = f"-qa3:{qa_prompt}" if qa_prompt else ""  # absent: the caption-only cache keys stay as they were
    version = "v1" if corpus == "shapes" else f"{corpus}-v1"  # shapes keeps the key earlier runs cached
    key = hashlib.sha1(f"{kind}-{model.config.to_json_string()}-{steps}-{seed}-{version}{qa_key}".encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"tiny-{kind}-lm-{key}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return
    rng = random.Random(seed)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    collate = (DecoderOnlyCollate(tokenizer, "", 64) if kind == "decoder"
               else PrefixLMCollate(tokenizer, 64, seed=seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        if not qa_prompt or (kind != "decoder" and step % 2 == 0):  # T5: caption and QA steps alternate
            batch = collate([random_caption(rng) for _ in range(32)])
        elif kind == "decoder":  # half captions, half reading comprehension
            batch = _join_decoder_batches(collate([random_caption(rng) for _ in range(16)]),
                                          qa_reading_batch(tokenizer, True, qa_prompt, 16, rng), tokenizer)
        else:  # T5: description + question prompt in the encoder, the answer as the decoder's target
            batch = qa_reading_batch(tokenizer, False, qa_prompt, 32, rng)
        if kind == "decoder":
            out = model(input_ids=batch["llm_input_ids"], attention_mask=batch["llm_attention_mask"],
                        labels=batch["llm_labels"])
        else:
            out = model(input_ids=batch["llm_input_ids"], attention_mask=batch["llm_attention_mask"],
                        labels=batch["llm_labels"], decoder_attention_mask=batch["llm_decoder_attention_mask"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    log.info("tiny %s LLM pretrained on synthetic captions for %d steps (final LM loss %.3f)", kind, steps,
             out.loss.item())
    torch.random.set_rng_state(generator_state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def qa_reading_texts(rng, count: int) -> list[tuple[str, str, str]]:
    """``count`` (description, question, answer) of synthetic QA scenes (data/synthetic_qa.py), in words.

    The description names what the image would show ("three red circles at the top on a green
    background"), repeated 1-3 times so that it spans about as many positions as the visual prompts it
    stands in for (the LLM's learned positions after them get trained); the answer is in the
    synthetic-QA answer vocabulary (digits for counts, as the VQA normalisation writes them). Half of the
    samples carry the answer alone, repeated 4-24 times, as their description: plain copying from before BOS,
    which the frozen LLM must do with the visual prompts (with scene descriptions only, 300 steps left it
    reading its prefix barely above the answer priors: docs/vqa.md, fourth pass).
    """
    from blip2_train.data.synthetic import COLORS, POSITIONS, SHAPES
    from blip2_train.data.synthetic_qa import COUNTS, NUMBER_WORDS, QUESTIONS

    out = []
    for _ in range(count):
        background = rng.choice(list(COLORS))
        color = rng.choice([c for c in COLORS if c != background])
        shape, position, number = rng.choice(SHAPES), rng.choice(list(POSITIONS)), rng.choice(COUNTS)
        plural = shape + ("es" if shape.endswith("s") else "s") if number > 1 else shape
        description = f"{NUMBER_WORDS[number]} {color} {plural} at the {position} on a {background} background"
        kind = rng.choice(list(QUESTIONS))
        answer = {"color": color, "background": background, "shape": shape, "where": position,
                  "count": str(number)}[kind]
        if rng.random() < 0.5:  # the whole scene: the question picks what to read from it
            description = " ".join([description] * rng.randint(1, 3))
        else:  # the answer alone, over as many positions as the visual prompts: plain copying from the prefix
            description = " ".join([answer] * rng.randint(4, 24))
        out.append((description, QUESTIONS[kind], answer))
    return out


def qa_reading_batch(tokenizer, decoder_only: bool, qa_prompt: str, count: int, rng) -> dict:
    """Tokenised reading-comprehension samples (``qa_reading_texts``) as the VQA collate lays them out.

    Decoder-only: [description tokens; BOS + prompt(question) + " " + answer + "\n"], the description
    where the visual prompts will be (before BOS), labels on the answer and "\n" only. Encoder-decoder:
    encoder text = description + prompt(question), decoder target = the answer.
    """
    from blip2_train.data.vqa import VQACollate

    rows = qa_reading_texts(rng, count)
    if not decoder_only:
        return VQACollate(tokenizer, False, "{}", 96, deterministic=True)(
            [{"question": f"{d} {qa_prompt.replace('{}', q)}", "answers": [a]} for d, q, a in rows])
    qa = VQACollate(tokenizer, True, qa_prompt, 64, deterministic=True)(
        [{"question": q, "answers": [a]} for _, q, a in rows])
    context = tokenizer([d for d, _, _ in rows], add_special_tokens=False)["input_ids"]
    width = max(len(c) for c in context) + qa["llm_input_ids"].shape[1]
    ids = torch.full((count, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, c in enumerate(context):  # left-aligned: description, then the question's row, then padding
        n = int(qa["llm_attention_mask"][i].sum())
        ids[i, :len(c)] = torch.tensor(c)
        ids[i, len(c):len(c) + n] = qa["llm_input_ids"][i, :n]
        labels[i, len(c):len(c) + n] = qa["llm_labels"][i, :n]
        mask[i, :len(c) + n] = 1
    return {"llm_input_ids": ids, "llm_attention_mask": mask, "llm_labels": labels}


def _join_decoder_batches(a: dict, b: dict, tokenizer) -> dict:
    """Two right-padded decoder-only batches as one (padded to the longer)."""
    width = max(a["llm_input_ids"].shape[1], b["llm_input_ids"].shape[1])
    pads = {"llm_input_ids": tokenizer.pad_token_id, "llm_attention_mask": 0, "llm_labels": -100}
    return {k: torch.cat([torch.nn.functional.pad(x[k], (0, width - x[k].shape[1]), value=v) for x in (a, b)])
            for k, v in pads.items()}
