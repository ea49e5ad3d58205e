"""Weights in the layout users download them in, written by the tests at tiny sizes.

Each fixture writes what a user would point the real presets at, with the libraries' own writers
(``state_dict`` / ``save_pretrained``), so that the code paths only real weights take run in the
default suite:

- ``open_clip_file``: an open_clip checkpoint file (``encoder=eva encoder.pretrained=FILE``), the
  tiny EVA architecture (``encoder.model_name=blip2-tiny-eva``) in place of EVA01-g-14;
- ``bert_dir``: a BERT directory with its tokenizer, as bert-base-uncased ships (no ``[DEC]``
  token: the Q-Former tokenizer adds it) (``qformer.bert=DIR``);
- ``opt_dir``: an OPT directory with its tokenizer, head tied to the embeddings as OPT's is
  (``llm=opt llm.model=DIR``);
- ``t5_dir``: a T5 directory with its tokenizer whose LM head is *not* tied to its embeddings and
  whose config says ``tie_word_embeddings: false``, as flan-t5's does (``llm=flant5 llm.model=DIR``).

The LLMs are taught the synthetic caption language for a few steps (``pretrain_tiny_llm``, as the
tiny presets are), so that their captions are words. :func:`hub_overrides` gives the overrides
that compose the real presets around these files at tiny sizes. All four build in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

#: Q-Former sizes of the BERT fixture (the Q-Former is initialised from it, so they must agree).
BERT_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
LLM_PRETRAIN_STEPS = 30


def _tokenizer_cache(root: Path) -> Path:
    return root / "tokenizer_builds"


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory) -> Path:
    """One directory per session for the hub-layout files."""
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="session")
def open_clip_file(hub_root) -> Path:
    """A full open_clip checkpoint of the tiny EVA (``visual.*`` and the text tower), as open_clip saves."""
    import open_clip

    import blip2_train.models.encoders  # noqa: F401 - registers the tiny architectures with open_clip

    torch.manual_seed(11)
    model = open_clip.create_model("blip2-tiny-eva")
    path = hub_root / "eva_tiny" / "open_clip_pytorch_model.bin"
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def bert_dir(hub_root) -> Path:
    """A BertForMaskedLM directory with a BertTokenizerFast whose vocabulary lacks [DEC] (as bert-base-uncased)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from blip2_train.models.tokenization import DEC_TOKEN, tiny_vocab

    directory = hub_root / "bert_tiny"
    directory.mkdir()
    vocab = [token for token in tiny_vocab() if token != DEC_TOKEN]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    assert len(tokenizer) == len(vocab)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(12)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(vocab), max_position_embeddings=64, **BERT_SIZES))
    bert.save_pretrained(directory)
    return directory


def _pretrained_llm(model, tokenizer, kind: str, root: Path) -> None:
    from blip2_train.training.tiny_llm import pretrain_tiny_llm

    pretrain_tiny_llm(model, tokenizer, kind, LLM_PRETRAIN_STEPS, root / "llm_pretrain", seed=0)


@pytest.fixture(scope="session")
def opt_dir(hub_root) -> Path:
    """An OPTForCausalLM directory (head tied to the embeddings) with its byte-level BPE tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    from blip2_train.models.llm import tiny_opt_tokenizer

    tokenizer = tiny_opt_tokenizer(_tokenizer_cache(hub_root))
    torch.manual_seed(13)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1,
                       bos_token_id=2, eos_token_id=2, dropout=0.1)
    model = OPTForCausalLM(config)
    _pretrained_llm(model, tokenizer, "decoder", hub_root)
    directory = hub_root / "opt_tiny"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def t5_dir(hub_root) -> Path:
    """A T5ForConditionalGeneration directory whose LM head is its own tensor (flan-t5's layout).

    transformers 5 forces ``tie_word_embeddings=True`` on every T5Config and ties the head at
    construction; the head is untied here by giving it its own parameter, both tensors are saved, and
    the config is written as flan-t5's hub config is (``tie_word_embeddings: false``, no decoder
    output scaling). ``from_pretrained`` then keeps the two apart (asserted below).
    """
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    from blip2_train.models.llm import tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer(_tokenizer_cache(hub_root))
    torch.manual_seed(14)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.1)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)  # its own head
    _pretrained_llm(model, tokenizer, "encoder_decoder", hub_root)
    directory = hub_root / "t5_tiny"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config_file = directory / "config.json"
    saved = json.loads(config_file.read_text())
    saved["tie_word_embeddings"] = False  # as google/flan-t5-* config.json
    saved.pop("scale_decoder_outputs", None)
    config_file.write_text(json.dumps(saved, indent=2))
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory)
    assert loaded.lm_head.weight.data_ptr() != loaded.shared.weight.data_ptr()
    assert not torch.equal(loaded.lm_head.weight, loaded.shared.weight)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and not loaded.config.scale_decoder_outputs
    return directory


def hub_overrides(open_clip_file: Path, bert_dir: Path, llm: str | None = None, llm_dir: Path | None = None
                  ) -> list[str]:
    """The real presets (``encoder=eva``, its bert-base Q-Former, ``llm=opt|flant5``) pointed at the
    hub-layout files, with the tiny sizes of those files swapped in."""
    overrides = ["encoder=eva", "encoder.model_name=blip2-tiny-eva", f"encoder.pretrained={open_clip_file}",
                 "encoder.image_size=64", "encoder.precision=fp32", f"qformer.bert={bert_dir}",
                 "qformer.num_query_tokens=8", "qformer.embed_dim=32"]
    overrides += [f"qformer.{key}={value}" for key, value in BERT_SIZES.items()]
    if llm is not None:
        overrides += ["stage=2", f"llm={llm}", f"llm.model={llm_dir}", "llm.precision=fp32"]
    return overrides
