"""The Q-Former tokenizer: bert-base-uncased + ``[DEC]``, or a tiny WordPiece built locally."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import BertTokenizerFast

DEC_TOKEN = "[DEC]"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", DEC_TOKEN]

# Words of the synthetic captions and everyday caption words; anything else splits into pieces.
TINY_WORDS = """
a an the of on in at with and or to is are this that photo picture image small large big tiny
red green blue yellow purple orange white black gray grey pink brown cyan
circle square triangle star cross ring diamond bar dot shape shapes
background top bottom middle center corner near next above below two one three
man woman person people dog cat car bus tree sky water street table room sitting standing
""".split()


def _build_tiny(directory: Path) -> BertTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # A fixed vocabulary (no training, so every build is identical): specials, whole words,
    # then single characters and their ## continuations, so any word splits into known pieces.
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-")
    vocab_list = SPECIALS + sorted(set(TINY_WORDS)) + alphabet + ["##" + c for c in alphabet]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", bos_token=DEC_TOKEN, do_lower_case=True)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    fast.save_pretrained(tmp)
    try:
        os.replace(tmp, directory)  # atomic: concurrent builders (DDP ranks) never see half a dir
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return BertTokenizerFast.from_pretrained(directory)


def build_qformer_tokenizer(name_or_path: str | None, cache_dir: str | os.PathLike) -> BertTokenizerFast:
    """``name_or_path``: a hub id or local dir of a BERT tokenizer; None builds the tiny one.

    The result always holds ``[DEC]`` (the ITG start token, also its ``bos_token``), so
    bert-base-uncased has 30523 tokens, as in LAVIS.
    """
    if name_or_path is None:
        directory = Path(cache_dir) / "qformer-tiny-wordpiece-v1"
        if (directory / "tokenizer.json").exists():
            return BertTokenizerFast.from_pretrained(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        return _build_tiny(directory)
    try:
        from blip2_train.hub import local_only

        tokenizer = BertTokenizerFast.from_pretrained(name_or_path, truncation_side="right",
                                                      local_files_only=local_only(name_or_path))
    except OSError as err:
        raise RuntimeError(
            f"Could not load the Q-Former tokenizer {name_or_path!r} ({err.__class__.__name__}). Without "
            f"internet, download it first (`huggingface-cli download bert-base-uncased --local-dir "
            f"/data/bert-base-uncased`) and pass qformer.tokenizer=/data/bert-base-uncased (and "
            f"qformer.bert=the same dir), or use a tiny encoder preset."
        ) from err
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer
