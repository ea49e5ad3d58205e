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
    then synthetic questions in that prompt with an answer of the question's type (text only, no
    image), so the LLM knows the answer format and stops after the answer, as a real LLM does.
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

    qa_key = f"-qa:{qa_prompt}" if qa_prompt else ""  # absent: the caption-only cache keys stay as they were
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
    qa_texts = None
    if qa_prompt:
        from blip2_train.data.synthetic_qa import QUESTIONS, answer_choices

        def qa_texts(count: int) -> tuple[list[str], list[str]]:
            kinds = [rng.choice(list(QUESTIONS)) for _ in range(count)]
            return ([qa_prompt.replace("{}", QUESTIONS[k]) for k in kinds],
                    [rng.choice(answer_choices(k)) for k in kinds])
    for step in range(steps):
        if qa_texts is None or (kind != "decoder" and step % 2 == 0):  # T5: caption and QA steps alternate
            batch = collate([random_caption(rng) for _ in range(32)])
        elif kind == "decoder":
            prompts, answers = qa_texts(16)
            batch = collate([random_caption(rng) for _ in range(16)] + [f"{p} {a}" for p, a in zip(prompts, answers)])
        else:  # T5: the question prompt in the encoder, the answer as the decoder's target
            from blip2_train.data.vqa import VQACollate

            prompts, answers = qa_texts(32)
            batch = VQACollate(tokenizer, False, "{}", 64, deterministic=True)(
                [{"question": p, "answers": [a]} for p, a in zip(prompts, answers)])
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
