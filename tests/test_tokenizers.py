"""Tokenizers: round trips, vocabularies, the eos separator, save/load."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.data.text import EOS, ByteTokenizer, CharTokenizer, Tokenizer, load_tokenizer, token_dtype, train_tokenizer
from attnlab.errors import DataError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Ünïcödé, naïve café; 東京 and Москва 🙂\n",
    "Show HN: I built a tokenizer in a weekend\n",
]
TRICKY = [
    "",
    " ",
    "  leading spaces",
    "trailing\n\n",
    "\r\n\t",
    "emoji 🤖👩‍👩‍👧 ok",
    "漢字かなカナ",
    "مرحبا",
    "literal <eos> in text",
    "<eos>",
    "\ufeffbom",
    "a" * 1000,
]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", CORPUS, 400)


# ----------------------------------------------------------------------- bpe


def test_bpe_vocab_and_eos(bpe):
    assert isinstance(bpe, Tokenizer) and bpe.kind == "bpe"
    assert bpe.eos_id == 0 and bpe.decode([bpe.eos_id]) == EOS
    assert 257 <= bpe.vocab_size <= 400  # 256 byte symbols + <eos> + merges, capped by the request
    assert max(max(ids) for ids in bpe.encode_batch(CORPUS)) < bpe.vocab_size


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trips_tricky_strings(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_literal_eos_text_is_not_the_separator(bpe):
    ids = bpe.encode("a <eos> b")
    assert bpe.eos_id not in ids


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_bpe_round_trip_property(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_encode_batch_matches_encode(bpe):
    assert bpe.encode_batch(TRICKY) == [bpe.encode(t) for t in TRICKY]


def test_bpe_learns_only_from_given_docs():
    train = ["alpha beta gamma\n" * 50]
    tok = train_tokenizer("bpe", train, 1000)
    assert len(tok.encode(" gamma")) == 1
    # a word never seen in training cannot be a single token
    assert len(tok.encode(" zyzzyvaquux")) > 1
    assert len(train_tokenizer("bpe", train + ["zyzzyvaquux " * 50], 1000).encode(" zyzzyvaquux")) == 1


# --------------------------------------------------------------------- bytes


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200))
def test_bytes_round_trip_property(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bytes_vocab_eos_and_partial_sequences():
    tok = train_tokenizer("bytes", CORPUS, 4096)
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("bytes", 256, 0)
    e_acute = tok.encode("é")  # two bytes
    assert tok.decode(e_acute[:1] + [0] + tok.encode("x")) == "\ufffd<eos>x"


# ---------------------------------------------------------------------- char


def test_char_vocab_and_round_trip():
    tok = train_tokenizer("char", ["hello", "wörld 🙂"], 4096)
    assert tok.kind == "char" and tok.eos_id == 0 and tok.unk_id == 1
    assert tok.vocab == [EOS, "<unk>", *sorted(set("hello" + "wörld 🙂"))]
    assert tok.vocab_size == len(tok.vocab)
    for text in ["hello wörld", "🙂 lol", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hex") == [tok.vocab.index("h"), tok.vocab.index("e"), 1]
    assert tok.decode([0, tok.vocab.index("h"), 1]) == "<eos>h<unk>"


def test_char_encode_matches_dict_lookup():
    tok = CharTokenizer.train(CORPUS)
    table = {c: i for i, c in enumerate(tok.vocab) if i >= 2}
    text = "".join(CORPUS) + "unseen: ∑ ß \x7f"
    assert tok.encode(text) == [table.get(c, 1) for c in text]


# ------------------------------------------------------------ save and load


@pytest.mark.parametrize("kind", ["bpe", "bytes", "char"])
def test_save_load_round_trip(tmp_path, kind):
    tok = train_tokenizer(kind, CORPUS, 350)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    json.loads(path.read_text(encoding="utf-8"))  # plain JSON
    back = load_tokenizer(path)
    assert (back.kind, back.vocab_size, back.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
    for text in TRICKY[:-1] + CORPUS:
        assert back.encode(text) == tok.encode(text)
    assert back.decode(tok.encode(CORPUS[2])) == CORPUS[2]


def test_load_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.json is missing"):
        load_tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json is not a readable tokenizer JSON.*--force"):
        load_tokenizer(bad)
    bad.write_text('{"kind": "char", "vocab": ["x"]}')
    with pytest.raises(DataError, match=r"bad\.json is not a valid char tokenizer"):
        load_tokenizer(bad)


def test_token_dtype_boundary():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
