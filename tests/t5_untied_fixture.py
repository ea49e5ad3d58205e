"""A tiny FlanT5 laid out as google/flan-t5-* ships on the hub: its own LM head (not tied to the
embeddings), ``tie_word_embeddings: false`` and ``dense_act_fn: gelu_new`` in config.json, a
sentencepiece-style tokenizer beside it. Loaded through the real preset: ``llm=flant5 llm.model=DIR``.

transformers 5.x builds every T5 with its head tied to ``shared`` (T5Config forces
``tie_word_embeddings=True``); ``from_pretrained`` keeps a checkpoint's head apart only when the file
holds two different tensors, as flan-t5's does. So the head is untied by hand before training and saving.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SIZES = {"d_model": 64, "d_kv": 16, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4}


def untie_head(model) -> None:
    """Give a T5ForConditionalGeneration an LM head of its own (a separate, newly drawn tensor)."""
    head = torch.empty_like(model.lm_head.weight)
    nn.init.normal_(head, std=model.config.d_model ** -0.5)
    model.lm_head.weight = nn.Parameter(head)
    model.all_tied_weights_keys.pop("lm_head.weight", None)


def build_untied_t5(directory: str | Path, cache_dir: str | Path, seed: int = 0) -> Path:
    """Write the hub-style directory (model, config, generation config, tokenizer) and return it.

    Random weights (no text pretraining: it costs minutes on a loaded CPU); tests that need captions
    ask for ``generation.min_new_tokens`` > 0, which a random LM's early end token cannot cut short.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    from blip2_train.models.llm import tiny_t5_tokenizer

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    tokenizer = tiny_t5_tokenizer(Path(cache_dir) / "tokenizers")
    config = T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.1, **SIZES)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    untie_head(model)
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # config.json as flan-t5-xl's reads (transformers 4.x wrote it): head untied, the activation gelu_new
    saved = json.loads((directory / "config.json").read_text())
    saved.pop("scale_decoder_outputs", None)
    saved.update(architectures=["T5ForConditionalGeneration"], tie_word_embeddings=False, dense_act_fn="gelu_new",
                 is_gated_act=True)
    (directory / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    return directory
