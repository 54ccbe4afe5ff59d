"""The prepared dataset folder: contents, split, integrity checks, overwrite rules."""

import gzip
import json
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from attnlab.config import DataConfig
from attnlab.data import store
from attnlab.data.sources import SHAKESPEARE_MD5
from attnlab.errors import DataError
from runkit import first_hn_titles

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

DOCS = [
    f"Document {i}: " + ("héllo wörld 🙂 " if i % 3 == 0 else "plain text, ") * (i % 5 + 1) + f"end {i}."
    for i in range(40)
]


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return p


def cfg_for(path, **kw):
    kw.setdefault("tokenizer", "bytes")
    return DataConfig(source=str(path), **kw)


def split_docs(ds, split):
    """Decode a split back into its documents (the stream is [eos] d1 [eos] d2 [eos] ...)."""
    ids = np.asarray(ds.tokens(split)).tolist()
    eos = ds.tokenizer.eos_id
    assert ids[0] == eos and ids[-1] == eos
    cuts = [i for i, t in enumerate(ids) if t == eos]
    return [ds.tokenizer.decode(ids[a + 1 : b]) for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("kind", ["bytes", "char", "bpe"])
def test_prepare_round_trips_documents(tmp_path, corpus, kind):
    out = tmp_path / "ds"
    meta = store.prepare(cfg_for(corpus, tokenizer=kind, vocab_size=300, val_frac=0.2), out, progress=False)
    assert {p.name for p in out.iterdir()} == {"train.bin", "val.bin", "tokenizer.json", "meta.json"}
    ds = store.load(out)
    assert ds.meta == meta and ds.vocab_size == meta["tokenizer"]["vocab_size"] == ds.tokenizer.vocab_size
    assert meta["dtype"] == "uint16" and ds.tokens("train").dtype == np.uint16
    per_split = {s: split_docs(ds, s) for s in ("train", "val")}
    assert Counter(per_split["train"] + per_split["val"]) == Counter(DOCS)  # split by document, nothing lost
    assert len(per_split["val"]) == round(0.2 * len(DOCS))
    for s, docs in per_split.items():
        info = meta["splits"][s]
        assert info["documents"] == len(docs)
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert info["chars"] == sum(len(d) for d in docs)
        assert info["tokens"] == len(ds.tokens(s)) == (out / f"{s}.bin").stat().st_size // 2
        assert info["unk_tokens"] == 0 or kind == "char"
    assert meta["data_config"]["source"] == str(corpus) and "dir" not in meta["data_config"]
    assert meta["source"]["documents"] == len(DOCS) and meta["document_separator"] == "<eos>"
    assert meta["format_version"] == 1 and meta["created"].endswith("+00:00")


def test_split_is_the_seeded_shuffle_prefix(tmp_path, corpus):
    ds = store.load(_prepared(tmp_path / "a", corpus, seed=7))
    order = np.random.default_rng(7).permutation(len(DOCS))
    n_val = round(0.1 * len(DOCS))
    assert split_docs(ds, "val") == [DOCS[i] for i in order[:n_val]]
    assert split_docs(ds, "train") == [DOCS[i] for i in order[n_val:]]


def test_split_is_seeded(tmp_path, corpus):
    a = store.load(_prepared(tmp_path / "a", corpus, seed=1))
    b = store.load(_prepared(tmp_path / "b", corpus, seed=1))
    c = store.load(_prepared(tmp_path / "c", corpus, seed=2))
    assert a.meta["splits"]["val"]["sha256"] == b.meta["splits"]["val"]["sha256"]
    assert a.meta["splits"]["train"]["sha256"] == b.meta["splits"]["train"]["sha256"]
    assert set(split_docs(a, "val")) != set(split_docs(c, "val"))


def test_bpe_prepare_is_reproducible(tmp_path, corpus):
    a = store.prepare(cfg_for(corpus, tokenizer="bpe", vocab_size=300), tmp_path / "a", progress=False)
    b = store.prepare(cfg_for(corpus, tokenizer="bpe", vocab_size=300), tmp_path / "b", progress=False)
    assert a["splits"] == b["splits"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_caps_that_leave_too_little_are_errors(tmp_path, corpus):
    with pytest.raises(DataError, match="max_bytes=5 is smaller than the first"):
        store.prepare(cfg_for(corpus, max_bytes=5), tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="only 1 document.*val_frac=0"):
        store.prepare(cfg_for(corpus, max_docs=1), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _prepared(out, corpus, **kw):
    store.prepare(cfg_for(corpus, **kw), out, progress=False)
    return out


def test_caps_keep_the_shuffled_prefix(tmp_path, corpus):
    ds = store.load(_prepared(tmp_path / "a", corpus, max_docs=10, val_frac=0.2))
    order = np.random.default_rng(1337).permutation(len(DOCS))
    assert split_docs(ds, "val") + split_docs(ds, "train") == [DOCS[i] for i in order[:10]]
    budget = 500
    ds = store.load(_prepared(tmp_path / "b", corpus, max_bytes=budget, val_frac=0.2))
    kept = split_docs(ds, "val") + split_docs(ds, "train")
    total = sum(len(d.encode()) for d in kept)
    nxt = DOCS[order[len(kept)]]
    assert kept == [DOCS[i] for i in order[: len(kept)]]
    assert total <= budget < total + len(nxt.encode())


def test_val_frac_zero_writes_no_val_split(tmp_path, corpus):
    ds = store.load(_prepared(tmp_path / "a", corpus, val_frac=0.0))
    assert ds.splits == ["train"] and not (ds.dir / "val.bin").exists()
    with pytest.raises(DataError, match="no 'val' split.*val_frac"):
        ds.tokens("val")


def test_tokens_are_read_only_memmaps(tmp_path, corpus):
    ds = store.load(_prepared(tmp_path / "a", corpus))
    t = ds.tokens("train")
    assert isinstance(t, np.memmap) and not t.flags.writeable


def test_bpe_tokenizer_never_sees_val_documents(tmp_path):
    # Each document repeats its own random word: training docs' words become single tokens,
    # validation docs' words cannot (BPE can only merge strings it saw in training).
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list(string.ascii_lowercase), 9)) for _ in range(12)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": (" " + w) * 40}) + "\n" for w in words))
    ds = store.load(_prepared(tmp_path / "ds", p, tokenizer="bpe", vocab_size=2000, val_frac=0.25))
    val_words = {d.split()[0] for d in split_docs(ds, "val")}
    train_words = {d.split()[0] for d in split_docs(ds, "train")}
    assert len(val_words) == 3 and not val_words & train_words
    for w in train_words:
        assert len(ds.tokenizer.encode(" " + w)) == 1
    for w in val_words:
        assert len(ds.tokenizer.encode(" " + w)) > 1


def test_char_unknowns_are_counted(tmp_path):
    p = tmp_path / "d.jsonl"
    docs = [f"doc {i} " + ("abc" if i % 2 else "xyz") for i in range(20)] + ["rare ∑∑ chars"]
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = store.load(_prepared(tmp_path / "ds", p, tokenizer="char", val_frac=0.3))
    train_chars = set("".join(split_docs(ds, "train")))
    val_ids = np.asarray(ds.tokens("val"))
    assert ds.meta["splits"]["val"]["unk_tokens"] == int((val_ids == 1).sum())
    expected = sum(c not in train_chars for d in docs for c in d if d not in split_docs(ds, "train"))
    assert ds.meta["splits"]["val"]["unk_tokens"] == expected
    assert ds.meta["splits"]["train"]["unk_tokens"] == 0


# ------------------------------------------------------------------ integrity


@pytest.fixture
def prepared(tmp_path, corpus):
    return _prepared(tmp_path / "ds", corpus)


def test_load_rejects_truncated_file(prepared):
    p = prepared / "val.bin"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"val\.bin does not match meta\.json \(size.*truncated.*--force"):
        store.load(prepared)


def test_load_rejects_flipped_byte(prepared):
    p = prepared / "train.bin"
    data = bytearray(p.read_bytes())
    data[10] ^= 0x01  # the low byte of a token: still a valid id, only the hash can tell
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train\.bin does not match meta\.json \(sha256 differs\)"):
        store.load(prepared)
    store.load(prepared, verify=False)  # the size check alone passes


@pytest.mark.parametrize(
    "dtype,match",
    [
        ("int8", r"meta\.json has unknown token dtype 'int8'"),
        ("uint32", r"meta\.json says dtype uint32 for vocab_size 256"),
    ],
)
def test_load_rejects_wrong_dtype(prepared, dtype, match):
    meta = json.loads((prepared / "meta.json").read_text())
    meta["dtype"] = dtype
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=match):
        store.load(prepared)


def test_load_rejects_missing_tokenizer(prepared):
    (prepared / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json is missing.*--force"):
        store.load(prepared)


def test_load_rejects_vocab_mismatch(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    meta["vocab_size"] = 300
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"tokenizer\.json has 256 tokens but meta\.json says 300"):
        store.load(prepared)


def test_load_missing_dir_or_meta(tmp_path, prepared):
    with pytest.raises(DataError, match="does not exist: create it with `attnlab prepare"):
        store.load(tmp_path / "nothing")
    (prepared / "meta.json").write_text("{truncated")
    with pytest.raises(DataError, match=r"meta\.json is not valid JSON"):
        store.load(prepared)
    (prepared / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json is missing.*attnlab prepare"):
        store.load(prepared)


def test_prepare_refuses_to_overwrite_without_force(prepared, corpus):
    before = (prepared / "meta.json").read_text()
    with pytest.raises(DataError, match="already exists: choose another --out or pass --force"):
        store.prepare(cfg_for(corpus, seed=5), prepared, progress=False)
    assert (prepared / "meta.json").read_text() == before
    # a failing forced prepare leaves the old dataset intact
    with pytest.raises(DataError):
        store.prepare(cfg_for(corpus.parent / "missing.jsonl"), prepared, force=True, progress=False)
    assert (prepared / "meta.json").read_text() == before
    meta = store.prepare(cfg_for(corpus, seed=5), prepared, force=True, progress=False)
    assert store.load(prepared).meta == meta and meta["data_config"]["seed"] == 5
    assert sorted(p.name for p in prepared.parent.iterdir() if p.name.startswith(".")) == []  # no temp leftovers


def test_prepare_into_empty_existing_folder(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    store.prepare(cfg_for(corpus), tmp_path / "empty", progress=False)
    assert store.load(tmp_path / "empty").meta["splits"]["train"]["documents"] > 0


def test_is_prepared_for(prepared, corpus):
    assert store.is_prepared_for(prepared, cfg_for(corpus))
    assert store.is_prepared_for(prepared, cfg_for(corpus, dir="elsewhere"))  # dir is ignored
    assert not store.is_prepared_for(prepared, cfg_for(corpus, seed=2))
    assert not store.is_prepared_for(prepared.parent / "nothing", cfg_for(corpus))


# ------------------------------------------------------------------ real data


def test_prepare_real_tinyshakespeare(tmp_path):
    path = SHARED / "tinyshakespeare" / "input.txt.gz"
    if not path.is_file():
        pytest.skip(f"shared tinyshakespeare copy not found at {path} (../shared/data beside the checkout)")
    meta = store.prepare(
        DataConfig(source="shakespeare", path=str(path), tokenizer="char"), tmp_path / "ds", progress=False
    )
    assert meta["source"]["md5"] == SHAKESPEARE_MD5 and meta["source"]["checksum_ok"]
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    n_docs = meta["source"]["documents"]
    total_bytes = sum(s["bytes"] for s in meta["splits"].values())
    # the documents are the file minus the blank lines between speeches (two are doubled) and the final newline
    assert n_docs == 7222
    assert total_bytes == len(text.replace("\n\n\n", "\n\n").encode()) - 2 * (n_docs - 1) - 1
    ds = store.load(tmp_path / "ds")
    val = split_docs(ds, "val")
    assert len(val) == round(0.1 * n_docs)
    assert all(d in text for d in val if "<unk>" not in d)  # characters unseen in train decode as <unk>
    assert meta["splits"]["val"]["unk_tokens"] == int((np.asarray(ds.tokens("val")) == 1).sum())


def test_prepare_real_hn_titles(tmp_path):
    p, titles = first_hn_titles(tmp_path / "titles.txt")
    store.prepare(DataConfig(source="hn-titles", path=str(p), vocab_size=512), tmp_path / "ds", progress=False)
    ds = store.load(tmp_path / "ds")
    assert ds.meta["splits"]["val"]["documents"] == 200 and ds.meta["splits"]["train"]["documents"] == 1800
    assert Counter(split_docs(ds, "train") + split_docs(ds, "val")) == Counter(titles)


# ------------------------------------------------------------ data.tokenizer_fit


def test_tokenizer_fit_train_val_sees_the_validation_documents(tmp_path, capsys):
    words = ["alpha", "beta", "gamma", "delta"]
    docs = [" ".join(words[(i + k) % 4] for k in range(6)) for i in range(20)]
    base = dict(format="lines", tokenizer="bpe", vocab_size=300, val_frac=0.25, seed=5)
    order = store.select_indices(docs, DataConfig(**base))  # which positions the split puts in val
    for i in order[:5]:
        docs[i] = "qjqjqjqj " * 8  # a string only validation documents hold
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")

    def prepared(**kw):
        out = tmp_path / "-".join(kw.values() or ["default"])
        store.prepare(DataConfig(source=str(corpus), **base, **kw), out, progress=False)
        return store.load(out)

    default, with_val = prepared(), prepared(tokenizer_fit="train+val")
    assert split_docs(default, "val") == split_docs(with_val, "val") == [docs[i] for i in order[:5]]
    pieces = [len(ds.tokenizer.encode_batch(["qjqjqjqj"])[0]) for ds in (default, with_val)]
    assert pieces[0] == 8 and pieces[1] < 8  # merged only when the val text was seen
    assert "tokenizer_fit" not in default.meta["data_config"]  # older datasets keep matching their configs
    assert with_val.meta["data_config"]["tokenizer_fit"] == "train+val"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "attnlab: warning: data.tokenizer_fit=train+val: the tokenizer is fit on the validation documents too "
        "(as the mainrun challenge does), so it has seen the validation text"
    ]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(tokenizer="bytes"), "data.tokenizer=bytes is not fit on anything: drop data.tokenizer_fit"),
        (dict(tokenizer_file="tok.json"), "but data.tokenizer_file gives one: drop one of them"),
    ],
)
def test_tokenizer_fit_train_val_needs_a_tokenizer_to_fit(tmp_path, corpus, kw, message):
    with pytest.raises(DataError, match=message):
        store.prepare(cfg_for(corpus, tokenizer_fit="train+val", **kw), tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()
