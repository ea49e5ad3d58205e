"""Frozen LLMs for stage 2: OPT (decoder-only) and FlanT5 (encoder-decoder), real or tiny.

Real models load with ``from_pretrained`` (hub id or local dir). Tiny ones are randomly
initialised with tokenizers built locally from a fixed vocabulary (identical on every build):
a byte-level BPE for OPT and a Unigram (sentencepiece-style) model for T5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from blip2_train.tokenization import TINY_WORDS

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXTRA_WORDS = ["question", "answer", "short", "what", "color", "shape", "size", "where", "how", "many"]


def _save_atomic(tokenizer, directory: Path):
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, directory)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def tiny_opt_tokenizer(cache_dir: str | os.PathLike):
    """OPT conventions: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3; BOS added in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    directory = Path(cache_dir) / "tiny-opt-bpe-v1"
    if not (directory / "tokenizer.json").exists():
        byte_chars = pre_tokenizers.ByteLevel.alphabet()
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for ch in sorted(byte_chars):
            vocab.setdefault(ch, len(vocab))
        merges = []
        for word in sorted(set(TINY_WORDS + EXTRA_WORDS)):
            for start in ("Ġ", ""):  # after a space, and at the start of the text
                piece = start or word[0]
                for ch in (word if start else word[1:]):  # merge left to right
                    merged = piece + ch
                    if merged not in vocab:
                        merges.append((piece, ch))
                        vocab[merged] = len(vocab)
                    piece = merged
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                           special_tokens=[("</s>", 2)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>")
        directory.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(fast, directory)
    return _load_tokenizer(str(directory))


def tiny_t5_tokenizer(cache_dir: str | os.PathLike):
    """T5 conventions: <pad>=0 (also the decoder start), </s>=1 appended, <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    directory = Path(cache_dir) / "tiny-t5-unigram-v1"
    if not (directory / "tokenizer.json").exists():
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
        pieces += [("▁" + w, -1.0) for w in sorted(set(TINY_WORDS + EXTRA_WORDS))]
        pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-:"]
        tok = Tokenizer(models.Unigram(pieces, unk_id=2))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
        fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                               extra_ids=0)
        directory.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(fast, directory)
    return _load_tokenizer(str(directory))


def _load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def _tiny_model(llm_cfg, tokenizer) -> nn.Module:
    sizes = dict(llm_cfg.tiny)
    if llm_cfg.kind == "decoder":
        from transformers import OPTConfig, OPTForCausalLM

        config = OPTConfig(vocab_size=len(tokenizer), hidden_size=sizes.get("hidden_size", 64),
                           num_hidden_layers=sizes.get("num_hidden_layers", 2),
                           num_attention_heads=sizes.get("num_attention_heads", 4),
                           ffn_dim=sizes.get("ffn_dim", 128), max_position_embeddings=256,
                           word_embed_proj_dim=sizes.get("hidden_size", 64), pad_token_id=1, bos_token_id=2,
                           eos_token_id=2, dropout=0.1)
        return OPTForCausalLM(config)
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tokenizer), d_model=sizes.get("d_model", 64), d_kv=sizes.get("d_kv", 16),
                      d_ff=sizes.get("d_ff", 128), num_layers=sizes.get("num_layers", 2),
                      num_decoder_layers=sizes.get("num_decoder_layers", 2), num_heads=sizes.get("num_heads", 4),
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.1)
    _set_activation(config, llm_cfg)
    return T5ForConditionalGeneration(config)


def _set_activation(config, llm_cfg) -> None:
    """``llm.dense_act_fn`` onto a T5 config before the model is built (its feed-forward reads it then).

    LAVIS's blip2_t5 and transformers' BLIP-2 conversion run flan-t5 with ``gelu`` where its own
    config.json says ``gelu_new``; the value travels in the model's config, so an export carries it.
    """
    act = llm_cfg.get("dense_act_fn")
    if act is not None:
        config.dense_act_fn = str(act)


def _pretrained(llm_cfg, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    loader = AutoModelForCausalLM if llm_cfg.kind == "decoder" else AutoModelForSeq2SeqLM
    name = llm_cfg.model
    local = os.path.isdir(str(name))
    if name is None:
        raise ValueError(f"llm={llm_cfg.name} needs llm.model (a hub id or a local directory)")
    try:
        from transformers import AutoTokenizer

        from blip2_train.hub import local_only

        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only(name))
        extra = {}
        if llm_cfg.kind == "encoder_decoder":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name, local_files_only=local or local_only(name))
            _set_activation(config, llm_cfg)
            extra["config"] = config
        model = loader.from_pretrained(name, dtype=dtype, local_files_only=local or local_only(name), **extra)
    except OSError as err:
        raise RuntimeError(
            f"The LLM {name!r} (llm={llm_cfg.name}) could not be loaded: {err.__class__.__name__}. "
            f"This machine cannot download it. Fetch it where there is internet "
            f"(`huggingface-cli download {name} --local-dir /models/{Path(str(name)).name}`), copy it here "
            f"and pass llm.model=/models/{Path(str(name)).name}."
        ) from err
    return model, tokenizer


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


class FrozenLLM(nn.Module):
    """Holds the frozen LLM; ``train()`` keeps it in eval mode unless ``dropout_in_train``."""

    def __init__(self, model: nn.Module, dropout_in_train: bool):
        super().__init__()
        self.model = model
        self.dropout_in_train = dropout_in_train
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode and self.dropout_in_train)
        return self

    # The LLM is used through these three methods, so that FSDP can gather its weights around each
    # (blip2_train/fsdp.py registers them as forward methods).
    def forward(self, **kwargs):
        return self.model(**kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: [B, T] -> [B, T, D]."""
        return self.model.get_input_embeddings()(input_ids)

    def generate(self, **kwargs) -> torch.Tensor:
        return self.model.generate(**kwargs)


def build_llm(llm_cfg, cache_dir: str | os.PathLike) -> tuple[FrozenLLM, object]:
    """(frozen LLM wrapper, tokenizer) for ``llm_cfg`` (an LLMConfig)."""
    dtype = DTYPES[llm_cfg.precision]
    if llm_cfg.name.startswith("tiny"):
        tokenizer = (tiny_opt_tokenizer if llm_cfg.kind == "decoder" else tiny_t5_tokenizer)(cache_dir)
        model = _tiny_model(llm_cfg, tokenizer)
        steps = int(dict(llm_cfg.tiny).get("pretrain_steps", 0))
        if steps:
            pretrain_tiny_llm(model, tokenizer, llm_cfg.kind, steps, cache_dir,
                              qa_prompt=dict(llm_cfg.tiny).get("pretrain_qa"),
                              corpus=str(dict(llm_cfg.tiny).get("corpus", "shapes")))
        model = model.to(dtype)
    else:
        model, tokenizer = _pretrained(llm_cfg, dtype)
    return FrozenLLM(model, llm_cfg.dropout_in_train), tokenizer
