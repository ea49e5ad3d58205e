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

from blip2_train.models.tokenization import TINY_WORDS

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

        from blip2_train.utils.hub import local_only

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
    # (blip2_train/training/fsdp.py registers them as forward methods).
    def forward(self, **kwargs):
        return self.model(**kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: [B, T] -> [B, T, D]."""
        return self.model.get_input_embeddings()(input_ids)

    def generate(self, **kwargs) -> torch.Tensor:
        return self.model.generate(**kwargs)


def build_llm(llm_cfg, cache_dir: str | os.PathLike, pretrain=None) -> tuple[FrozenLLM, object]:
    """(frozen LLM wrapper, tokenizer) for ``llm_cfg`` (an LLMConfig).

    A tiny LLM with ``llm.tiny.pretrain_steps`` is taught its language before it is frozen by
    ``pretrain(model, tokenizer, llm_cfg, cache_dir)`` (``training.tiny_llm.pretrain_from_config``: the
    loop reads data/, which models/ does not import, so the caller hands it over)."""
    dtype = DTYPES[llm_cfg.precision]
    if llm_cfg.name.startswith("tiny"):
        tokenizer = (tiny_opt_tokenizer if llm_cfg.kind == "decoder" else tiny_t5_tokenizer)(cache_dir)
        model = _tiny_model(llm_cfg, tokenizer)
        steps = int(dict(llm_cfg.tiny).get("pretrain_steps", 0))
        if steps:
            if pretrain is None:
                raise ValueError(f"llm={llm_cfg.name} has llm.tiny.pretrain_steps={steps}: pass build_llm(..., "
                                 f"pretrain=blip2_train.training.tiny_llm.pretrain_from_config), or set "
                                 f"llm.tiny.pretrain_steps=0 for a random LLM")
            pretrain(model, tokenizer, llm_cfg, cache_dir)
        model = model.to(dtype)
    else:
        model, tokenizer = _pretrained(llm_cfg, dtype)
    return FrozenLLM(model, llm_cfg.dropout_in_train), tokenizer
