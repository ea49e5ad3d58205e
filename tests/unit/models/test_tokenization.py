"""Q-Former tokenizer: [DEC] as bos, the tiny local WordPiece, BERT dirs, offline errors."""

import pytest

from blip2_train.data.synthetic import COLORS, POSITIONS, SHAPES, SIZES
from blip2_train.models.tokenization import TINY_DIR_NAME, build_qformer_tokenizer, tiny_vocab


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_qformer_tokenizer(None, tmp_path_factory.mktemp("tok"))


def test_tiny_tokenizer_has_dec_as_bos_and_a_small_vocab(tiny):
    assert len(tiny) == 164 and tiny.vocab_size == 164
    assert [tiny.pad_token_id, tiny.unk_token_id, tiny.cls_token_id, tiny.sep_token_id, tiny.mask_token_id] == \
        [0, 1, 2, 3, 4]
    assert tiny.bos_token == "[DEC]" and tiny.bos_token_id == tiny.convert_tokens_to_ids("[DEC]") == 5


def test_tiny_tokenizer_is_deterministic_and_reloads_identically(tmp_path, tiny):
    first = build_qformer_tokenizer(None, tmp_path / "a")
    other = build_qformer_tokenizer(None, tmp_path / "b")
    assert (tmp_path / "a" / TINY_DIR_NAME / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / TINY_DIR_NAME / "tokenizer.json").read_bytes()
    reloaded = build_qformer_tokenizer(None, tmp_path / "a")  # from the cache this time
    text = "A large red circle at the top, on a zebra-striped background!"
    ids = tiny(text)["input_ids"]
    assert ids == first(text)["input_ids"] == other(text)["input_ids"] == reloaded(text)["input_ids"]
    assert reloaded.get_vocab() == tiny.get_vocab() == tiny_vocab() and reloaded.bos_token_id == 5


def test_tiny_tokenizer_knows_the_synthetic_words_and_splits_others(tiny):
    words = list(COLORS) + list(SHAPES) + list(SIZES) + list(POSITIONS) + ["a", "at", "the", "on", "background"]
    for word in words:
        assert tiny.tokenize(word) == [word]
    assert tiny.tokenize("Zebra") == ["z", "##e", "##b", "##r", "##a"]
    text = "a small pink ring at the bottom on a gray background"
    ids = tiny(text)["input_ids"]
    assert ids[0] == tiny.cls_token_id and ids[-1] == tiny.sep_token_id and len(ids) == 13
    assert tiny.unk_token_id not in ids and tiny.decode(ids, skip_special_tokens=True) == text


def _bert_like_dir(path, words):
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")  # what from_pretrained reads from a bert dir
    return len(vocab)


def test_bert_dir_gets_dec_appended_once(tmp_path):
    size = _bert_like_dir(tmp_path / "bert", ["a", "dog", "cat", "##s"])  # 10 tokens, as bert's 30522
    tok = build_qformer_tokenizer(str(tmp_path / "bert"), tmp_path / "cache")
    assert len(tok) == size + 1 == 11
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == tok.convert_tokens_to_ids("[DEC]") == size
    assert tok("A dog")["input_ids"] == [3, 6, 7, 4]  # [CLS] a dog [SEP]
    tok.save_pretrained(tmp_path / "saved")  # a dir that already holds [DEC] (as LAVIS saves it)
    again = build_qformer_tokenizer(str(tmp_path / "saved"), tmp_path / "cache")
    assert len(again) == 11 and again.bos_token_id == 10


def test_unavailable_tokenizer_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"huggingface-cli download blip2-test/no-such-bert --local-dir "
                                           r"/data/no-such-bert.*qformer.tokenizer=/data/no-such-bert"):
        build_qformer_tokenizer("blip2-test/no-such-bert", tmp_path)
    with pytest.raises(RuntimeError, match=r"directory .*missing-dir does not exist.*huggingface-cli download "
                                           r"bert-base-uncased"):
        build_qformer_tokenizer(str(tmp_path / "missing-dir"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match=r"neither tokenizer.json nor vocab.txt"):
        build_qformer_tokenizer(str(tmp_path / "empty"), tmp_path)
