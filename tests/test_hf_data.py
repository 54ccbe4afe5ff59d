"""Any dataset: the hf: source on local copies (never the network), --export-hf, --tokenizer-file."""

import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from attnlab import cli  # noqa: E402
from attnlab.config import DataConfig  # noqa: E402
from attnlab.data import store  # noqa: E402
from attnlab.data.sources import load_documents  # noqa: E402
from attnlab.data.text import EOS, BPETokenizer, tokenizer_from_file  # noqa: E402
from attnlab.errors import DataError  # noqa: E402

TEXTS = [f"document {i}: " + "word " * (i % 7 + 1) for i in range(40)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub: the variables for subprocesses, the libraries' own flags (read at import) for this process."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()


@pytest.fixture
def hf_folder(tmp_path):
    path = tmp_path / "hfds"
    datasets.Dataset.from_dict({"text": TEXTS, "label": list(range(40)), "lang": ["en"] * 40}).save_to_disk(str(path))
    return path


def arxiv_file(tmp_path, n=30):
    p = tmp_path / "arxiv.jsonl"
    with open(p, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "id": f"2101.{i:05d}",
                        "title": f"Paper  {i}",
                        "abstract": f" We study {i}. ",
                        "categories": "cs.LG stat.ML" if i % 2 else "math.CO",
                        "authors": f"A{i}",
                    }
                )
                + "\n"
            )
    return p


def prepare(*args):
    return cli.main(["prepare", *map(str, args)])


# ------------------------------------------------------------------ hf: source


def test_hf_source_reads_a_save_to_disk_folder_with_metadata(hf_folder):
    result = load_documents(DataConfig(source=f"hf:{hf_folder}"))
    assert result.docs == TEXTS
    assert result.meta[3] == {"label": 3, "lang": "en"}
    assert result.info["kind"] == "hf" and result.info["rows"] == 40 and result.info["split"] == "train"


def test_hf_source_reads_a_split_of_a_dataset_dict(tmp_path):
    path = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["a", "b"]}),
            "test": datasets.Dataset.from_dict({"body": ["c", "d", "e"]}),
        }
    ).save_to_disk(str(path))
    assert load_documents(DataConfig(source=f"hf:{path}", split="test", field="body")).docs == ["c", "d", "e"]
    with pytest.raises(DataError, match=r"has no split 'dev': set data.split to one of train, test"):
        load_documents(DataConfig(source=f"hf:{path}", split="dev", field="body"))


def test_hf_source_reads_parquet_files_and_data_path(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": TEXTS[:20]}).to_parquet(str(folder / "part-0.parquet"))
    datasets.Dataset.from_dict({"text": TEXTS[20:]}).to_parquet(str(folder / "part-1.parquet"))
    assert load_documents(DataConfig(source=f"hf:{folder}")).docs == TEXTS
    assert load_documents(DataConfig(source=f"hf:{folder / 'part-1.parquet'}")).docs == TEXTS[20:]
    # data.path: a local copy of a hub dataset; the hub is never asked
    assert load_documents(DataConfig(source="hf:someone/corpus", path=str(folder))).docs == TEXTS


def test_hf_source_errors_are_one_line(tmp_path, hf_folder):
    with pytest.raises(DataError, match=r"^hf:.*has no field 'body' \(available: text, label, lang\): set data.field"):
        load_documents(DataConfig(source=f"hf:{hf_folder}", field="body"))
    with pytest.raises(
        DataError,
        match=r"^cannot load hf:nobody/nothing-here from the Hugging Face hub \(no network.*"
        r"pass data.path=/path/to/a local copy",
    ):
        load_documents(DataConfig(source="hf:nobody/nothing-here"))
    with pytest.raises(DataError, match=r"does not exist: pass an existing path, or data.path="):
        load_documents(DataConfig(source=f"hf:{tmp_path / 'missing'}"))
    with pytest.raises(DataError, match=r"column 'label' holds int, not text"):
        load_documents(DataConfig(source=f"hf:{hf_folder}", field="label"))


def test_prepare_hf_source_gives_the_same_dataset_as_the_same_lines_file(tmp_path, hf_folder):
    lines = tmp_path / "same.txt"
    lines.write_text("\n".join(TEXTS) + "\n")
    assert prepare(f"hf:{hf_folder}", "--out", tmp_path / "a", "--tokenizer", "bytes", "--max-docs", 30) == 0
    assert prepare(lines, "--format", "lines", "--out", tmp_path / "b", "--tokenizer", "bytes", "--max-docs", 30) == 0
    a, b = store.load(tmp_path / "a"), store.load(tmp_path / "b")
    for split in ("train", "val"):
        assert np.array_equal(a.tokens(split), b.tokens(split))
    assert a.meta["splits"]["train"]["documents"] + a.meta["splits"]["val"]["documents"] == 30


def test_prepare_offline_without_a_copy_exits_with_one_line(tmp_path, capsys):
    assert prepare("hf:nobody/nothing-here", "--out", tmp_path / "o") == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.path" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ --export-hf


def test_export_hf_round_trip_keeps_arxiv_fields_and_the_split(tmp_path):
    src = arxiv_file(tmp_path)
    assert (
        prepare(
            "arxiv-abstracts",
            "--path",
            src,
            "--out",
            tmp_path / "ds",
            "--tokenizer",
            "bytes",
            "--export-hf",
            tmp_path / "hf",
        )
        == 0
    )
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    assert sorted(dd) == ["train", "validation"]
    assert dd["train"].column_names == ["text", "id", "categories", "authors"]
    ds = store.load(tmp_path / "ds")
    for name, split in (("train", "train"), ("validation", "val")):
        rows = dd[name]
        # the same documents, in the same order, as the .bin split
        assert ds.tokenizer.decode(ds.tokens(split)).split(EOS)[1:-1] == list(rows["text"])
        assert len(rows) == ds.meta["splits"][split]["documents"]
        for row in rows:
            i = int(row["id"].split(".")[1])
            assert row["text"] == f"Paper {i}\nWe study {i}."
            assert row["categories"] == ("cs.LG stat.ML" if i % 2 else "math.CO") and row["authors"] == f"A{i}"
    assert len(dd["train"]) + len(dd["validation"]) == 30


def test_export_hf_keeps_the_filtered_documents_only(tmp_path):
    src = arxiv_file(tmp_path)
    assert (
        prepare(
            src,
            "--format",
            "arxiv",
            "--categories",
            "cs",
            "--out",
            tmp_path / "ds",
            "--tokenizer",
            "bytes",
            "--export-hf",
            tmp_path / "hf",
        )
        == 0
    )
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    ids = list(dd["train"]["id"]) + list(dd["validation"]["id"])
    assert sorted(ids) == [f"2101.{i:05d}" for i in range(1, 30, 2)]


def test_export_hf_of_an_hf_source_keeps_its_columns(tmp_path, hf_folder):
    assert (
        prepare(f"hf:{hf_folder}", "--out", tmp_path / "ds", "--tokenizer", "bytes", "--export-hf", tmp_path / "hf")
        == 0
    )
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    rows = dd["train"].to_list() + dd["validation"].to_list()
    assert sorted(rows, key=lambda r: r["label"]) == [
        {"text": t, "label": i, "lang": "en"} for i, t in enumerate(TEXTS)
    ]


def test_export_hf_of_a_plain_text_source_has_text_only(tmp_path):
    lines = tmp_path / "l.txt"
    lines.write_text("\n".join(TEXTS))
    assert (
        prepare(
            lines, "--format", "lines", "--out", tmp_path / "ds", "--tokenizer", "bytes", "--export-hf", tmp_path / "hf"
        )
        == 0
    )
    assert datasets.load_from_disk(str(tmp_path / "hf"))["validation"].column_names == ["text"]


def test_export_hf_refuses_an_existing_folder_before_any_work(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert (
        prepare(arxiv_file(tmp_path), "--format", "arxiv", "--out", tmp_path / "ds", "--export-hf", tmp_path / "hf")
        == 3
    )
    err = capsys.readouterr().err
    assert "--export-hf" in err and "already exists" in err and "--force" in err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine" and not (tmp_path / "ds").exists()


# ------------------------------------------------------------------ --tokenizer-file


def hf_tokenizer_file(path, specials, truncate=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    if truncate:
        tok.enable_truncation(truncate)
    tok.save(str(path))
    return path


def test_tokenizer_file_uses_its_end_of_text_token_as_separator(tmp_path):
    from tokenizers import Tokenizer

    f = hf_tokenizer_file(tmp_path / "gpt.json", ["<|endoftext|>"], truncate=4)
    lines = tmp_path / "l.txt"
    lines.write_text("\n".join(TEXTS))
    assert prepare(lines, "--format", "lines", "--out", tmp_path / "ds", "--tokenizer-file", f) == 0
    ds = store.load(tmp_path / "ds")
    original = Tokenizer.from_file(str(f))
    assert ds.vocab_size == original.get_vocab_size() == 300  # the file's vocabulary, nothing trained or added
    eos = original.token_to_id("<|endoftext|>")
    assert ds.tokenizer.eos_id == eos and ds.meta["document_separator"] == "<|endoftext|>"
    assert ds.meta["tokenizer"]["eos_token"] == "<|endoftext|>"
    # every document encoded whole (the file's truncation is dropped), with the file's own ids
    toks = ds.tokens("train").tolist()
    docs = ds.tokenizer.decode(toks).split("<|endoftext|>")[1:-1]
    original.no_truncation()
    assert toks == [eos] + [t for d in docs for t in original.encode(d).ids + [eos]]
    # a literal separator in the text is text, as with attnlab's own <eos>
    assert eos not in ds.tokenizer.encode("a <|endoftext|> b")


def test_tokenizer_file_without_an_end_token_gets_eos_added(tmp_path):
    f = hf_tokenizer_file(tmp_path / "plain.json", [])
    tok = tokenizer_from_file(f)
    assert tok.vocab_size == 301 and tok.eos_id == 300 and tok.eos_token == EOS
    tok.save(tmp_path / "saved.json")
    again = BPETokenizer.from_file(tmp_path / "saved.json")
    assert (again.vocab_size, again.eos_id) == (301, 300)
    assert again.encode("document 3: word") == tok.encode("document 3: word")


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.tokenizer_file '.*nope.json' does not exist"):
        tokenizer_from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"is not a Hugging Face tokenizer.json"):
        tokenizer_from_file(tmp_path / "bad.json")
    with pytest.raises(DataError, match=r"set data.tokenizer=bpe"):
        tokenizer_from_file(tmp_path / "bad.json", "char")


def test_new_data_keys_at_defaults_leave_the_config_record_unchanged():
    record = store.config_record(DataConfig())
    assert not set(store.LATER_KEYS) & set(record)
    assert store.config_record(DataConfig(tokenizer_file="t.json"))["tokenizer_file"] == "t.json"
