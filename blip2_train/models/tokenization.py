"""The Q-Former tokenizer: bert-base-uncased + ``[DEC]``, or a tiny WordPiece built locally."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from transformers import BertTokenizerFast

DEC_TOKEN = "[DEC]"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", DEC_TOKEN]
TINY_DIR_NAME = "qformer-tiny-wordpiece-v1"  # bump the suffix when the tiny vocabulary changes

# Words of the synthetic captions and everyday caption words; anything else splits into pieces.
TINY_WORDS = """
a an the of on in at with and or to is are this that photo picture image small large big tiny
red green blue yellow purple orange white black gray grey pink brown cyan
circle square triangle star cross ring diamond bar dot shape shapes
background top bottom middle center corner near next above below two one three
man woman person people dog cat car bus tree sky water street table room sitting standing
""".split()  # noqa: SIM905 - a block of words reads better than a list
TINY_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-")


def tiny_vocab() -> dict[str, int]:
    """Specials ([PAD]=0), whole words, then characters and their ``##`` continuations.

    A fixed vocabulary rather than a trained one, so every build is identical; the characters make
    any lowercase word split into known pieces instead of [UNK].
    """
    tokens = SPECIALS + sorted(set(TINY_WORDS)) + TINY_ALPHABET + ["##" + c for c in TINY_ALPHABET]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _build_tiny(directory: Path) -> BertTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(vocab=tiny_vocab(), unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", bos_token=DEC_TOKEN, do_lower_case=True)
    tmp = directory.with_name(f"{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    fast.save_pretrained(tmp)
    try:
        os.replace(tmp, directory)  # atomic: concurrent builders (DDP ranks) never see half a dir
    except OSError:  # another process got there first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return BertTokenizerFast.from_pretrained(directory)


def _missing_tokenizer_error(name_or_path: str, why: str) -> RuntimeError:
    is_path = name_or_path.startswith((".", "/", "~")) or os.path.isdir(name_or_path)
    repo = "bert-base-uncased" if is_path else name_or_path
    local = f"/data/{repo.split('/')[-1]}"
    return RuntimeError(
        f"Could not load the Q-Former tokenizer {name_or_path!r}: {why}. Without internet, download it "
        f"first (`huggingface-cli download {repo} --local-dir {local}`) and pass qformer.tokenizer={local} "
        f"(and qformer.bert=the same dir), or use qformer=tiny (qformer.bert=null, "
        f"qformer.tokenizer=null: a small tokenizer built locally)."
    )


def build_qformer_tokenizer(name_or_path: str | None, cache_dir: str | os.PathLike) -> BertTokenizerFast:
    """``name_or_path``: a hub id or local dir of a BERT tokenizer; None builds the tiny one.

    The result always holds ``[DEC]`` as its ``bos_token`` (the ITG start token, so
    ``tokenizer.bos_token_id`` is its id); bert-base-uncased then has 30523 tokens, as in LAVIS.
    The tiny one (164 tokens, [PAD]=0) is saved under ``cache_dir`` and reloaded from there.
    """
    if name_or_path is None:
        directory = Path(cache_dir) / TINY_DIR_NAME
        if (directory / "tokenizer.json").exists():
            return BertTokenizerFast.from_pretrained(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        return _build_tiny(directory)
    name = str(name_or_path)
    local = os.path.expanduser(name)
    if name.startswith((".", "/", "~")) and not os.path.isdir(local):
        raise _missing_tokenizer_error(name, f"the directory {local} does not exist")
    if os.path.isdir(local) and not any(os.path.exists(os.path.join(local, f))
                                        for f in ("tokenizer.json", "vocab.txt")):
        raise _missing_tokenizer_error(name, f"{local} holds neither tokenizer.json nor vocab.txt "
                                             f"(found: {sorted(os.listdir(local))[:10]})")
    try:
        from blip2_train.utils.hub import local_only

        tokenizer = BertTokenizerFast.from_pretrained(local if os.path.isdir(local) else name,
                                                      truncation_side="right",
                                                      local_files_only=local_only(local))
    except (OSError, ValueError) as err:
        raise _missing_tokenizer_error(name, f"{err.__class__.__name__}: {str(err).splitlines()[0]}") from err
    # transformers 5 returns a tokenizer holding only the special tokens, without an error, when an
    # offline hub id is not in the cache: a vocabulary that small means the files were not found.
    if tokenizer.vocab_size <= len(SPECIALS):
        raise _missing_tokenizer_error(name, "its vocabulary files are not in the local cache")
    # Sets bos_token to [DEC]; adds it (id = old vocab size) only when absent, e.g. a LAVIS save.
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer
