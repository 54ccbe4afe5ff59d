"""Document sources: local formats, named sources, and their errors."""

import gzip
import json
import socket
import sys
import urllib.error
from pathlib import Path

import pytest

from attnlab.config import DataConfig
from attnlab.data import sources
from attnlab.data.sources import load_documents
from attnlab.errors import DataError
from runkit import first_hn_titles

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt.gz"


def docs_of(path, **kw):
    return load_documents(DataConfig(source=str(path), **kw)).docs


def write_jsonl(path, records, compress=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# ------------------------------------------------------------- local formats


def test_text_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("line one\n\nline two\n", encoding="utf-8")
    result = load_documents(DataConfig(source=str(p)))
    assert result.docs == ["line one\n\nline two\n"]
    assert result.info["format"] == "text" and len(result.info["sha256"]) == 64


def test_lines_format_gives_one_document_per_nonblank_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first\r\n\n  \nsecond line  \nthird", encoding="utf-8")
    assert docs_of(p, format="lines") == ["first", "second line  ", "third"]


def test_gzip_text_and_lines(tmp_path):
    p = tmp_path / "a.txt.gz"
    p.write_bytes(gzip.compress("héllo\nwörld\n".encode()))
    assert docs_of(p) == ["héllo\nwörld\n"]
    assert docs_of(p, format="lines") == ["héllo", "wörld"]


def test_a_gz_file_that_is_not_gzip_is_refused(tmp_path):
    p = tmp_path / "titles.txt.gz"  # e.g. an error page saved by a download
    p.write_bytes(b"<!DOCTYPE html><html>Not Found</html>")
    with pytest.raises(DataError) as e:
        docs_of(p, format="lines")
    assert str(e.value) == (
        f"{p} is named .gz but is not gzip data (it starts with b'<!DOCTYPE html><'): re-download it, "
        "or rename it without .gz if it is plain text"
    )
    plain = tmp_path / "titles.txt"
    p.rename(plain)
    assert docs_of(plain, format="lines") == ["<!DOCTYPE html><html>Not Found</html>"]


def test_folder_is_one_document_per_file_sorted_by_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "sub" / "a.txt").write_text("SUB-A")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / ".hidden").write_text("secret")
    result = load_documents(DataConfig(source=str(tmp_path)))
    assert result.docs == ["A", "B", "SUB-A"]
    assert result.info["files"] == 3


def test_jsonl_default_and_custom_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "one", "body": "x"}, {"text": "two", "body": "y"}])
    assert docs_of(p) == ["one", "two"]
    assert docs_of(p, field="body") == ["x", "y"]
    gz = write_jsonl(tmp_path / "d.jsonl.gz", [{"text": "zipped"}], compress=True)
    assert docs_of(gz) == ["zipped"]


def test_jsonl_missing_field_lists_available(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(DataError) as e:
        docs_of(p, field="content")
    msg = str(e.value)
    assert "'content'" in msg and "body" in msg and "id" in msg and "data.field" in msg


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2 is not valid JSON"):
        docs_of(p)


def test_csv_column_with_quoting(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,text\n1,"hello, world"\n2,"multi\nline ""quoted"""\n', encoding="utf-8")
    assert docs_of(p) == ["hello, world", 'multi\nline "quoted"']
    with pytest.raises(DataError, match=r"available: id, text"):
        docs_of(p, field="title")


def test_tsv_column_keeps_quotes_verbatim(tmp_path):
    p = tmp_path / "d.tsv.gz"
    p.write_bytes(gzip.compress(b'id\ttitle\n1\t"Memory foam" approach\n2\tplain\n'))
    assert docs_of(p, field="title") == ['"Memory foam" approach', "plain"]


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["alpha", None, "gamma"], "n": [1, 2, 3]}), p)
    assert docs_of(p, field="body") == ["alpha", "gamma"]
    with pytest.raises(DataError, match=r"available: body, n"):
        docs_of(p)


ARXIV = [
    {"id": "1", "title": "  Deep\n   Nets ", "abstract": "  We study nets.\n", "categories": "cs.LG stat.ML"},
    {"id": "2", "title": "Groups", "abstract": "Finite groups.", "categories": "math.GR"},
    {"id": "3", "title": "Fields", "abstract": "Physics of fields.", "categories": "math-ph hep-th"},
    {"id": "4", "title": "Vision", "abstract": "Images.", "categories": "cs.CV"},
]


def test_arxiv_format_and_category_filter(tmp_path):
    p = write_jsonl(tmp_path / "arxiv.json", ARXIV)
    assert docs_of(p, format="arxiv") == [
        "Deep Nets\nWe study nets.",
        "Groups\nFinite groups.",
        "Fields\nPhysics of fields.",
        "Vision\nImages.",
    ]
    assert docs_of(p, format="arxiv", categories=["cs"]) == ["Deep Nets\nWe study nets.", "Vision\nImages."]
    assert docs_of(p, format="arxiv", categories=["cs.LG"]) == ["Deep Nets\nWe study nets."]
    # `math` is a prefix of `math-ph` but not its archive: only math.GR matches
    assert docs_of(p, format="arxiv", categories=["math"]) == ["Groups\nFinite groups."]
    assert docs_of(p, format="arxiv", categories=["math-ph"]) == ["Fields\nPhysics of fields."]


def test_arxiv_named_source_with_local_snapshot(tmp_path):
    p = write_jsonl(tmp_path / "arxiv-metadata-oai-snapshot.json.gz", ARXIV, compress=True)
    result = load_documents(DataConfig(source="arxiv-abstracts", path=str(p), categories=["stat"]))
    assert result.docs == ["Deep Nets\nWe study nets."]
    assert result.info["categories_filter"] == ["stat"]


def test_arxiv_filter_matching_nothing_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ARXIV)
    with pytest.raises(DataError, match="0 documents.*categories"):
        docs_of(p, format="arxiv", categories=["q-bio"])


def test_nul_characters_are_removed(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("a\x00b\x00", encoding="utf-8")
    assert docs_of(p) == ["ab"]


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as e:
        docs_of(missing)
    assert str(missing) in str(e.value) and "data.source" in str(e.value)


def test_named_source_missing_local_copy(tmp_path):
    with pytest.raises(DataError, match=r"data\.path.*does not exist: pass data\.path="):
        load_documents(DataConfig(source="shakespeare", path=str(tmp_path / "input.txt")))


@pytest.mark.parametrize("content,fmt", [("", "text"), ("\n \n\n", "lines"), ("", "jsonl")])
def test_empty_input_is_an_error(tmp_path, content, fmt):
    p = tmp_path / "empty.data"
    p.write_text(content)
    with pytest.raises(DataError, match="0 documents"):
        docs_of(p, format=fmt)


def test_non_utf8_file_is_an_error(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        docs_of(p)


# ------------------------------------------------------------- python-stdlib


def test_python_stdlib_filters_and_orders(tmp_path):
    files = {
        "b.py": "B",
        "a.py": "A",
        "pkg/c.py": "C",
        "pkg/notes.txt": "no",
        "test/t.py": "T",
        "pkg/tests/u.py": "U",
        "idlelib/i.py": "I",
        "lib2to3/l.py": "L",
        "turtledemo/d.py": "D",
        "site-packages/s.py": "S",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "z.py").write_bytes("# caf\xe9".encode("latin-1"))  # not UTF-8: skipped
    result = load_documents(DataConfig(source="python-stdlib", path=str(tmp_path)))
    assert result.docs == ["A", "B", "C"]
    assert result.info["skipped_not_utf8"] == 1


def test_python_stdlib_real():
    a = load_documents(DataConfig(source="python-stdlib"))
    b = load_documents(DataConfig(source="python-stdlib"))
    assert len(a.docs) > 100 and a.docs == b.docs and a.info["sha256"] == b.info["sha256"]
    assert a.info["python_version"] == sys.version.split()[0]
    assert any("def " in d for d in a.docs)


# ------------------------------------------------------------- named sources


def test_hn_titles_local_lines_and_tsv(tmp_path):
    txt = tmp_path / "titles.txt.gz"
    txt.write_bytes(gzip.compress(b"  Show HN: a thing \n\nAsk HN: why?\n"))
    assert load_documents(DataConfig(source="hn-titles", path=str(txt))).docs == ["Show HN: a thing", "Ask HN: why?"]
    tsv = tmp_path / "titles.tsv"
    tsv.write_text('hn_id\tsource\ttitle\n1\tx\t"Quoted" title\n2\tx\t \n')
    assert load_documents(DataConfig(source="hn-titles", path=str(tsv))).docs == ['"Quoted" title']


def _offline_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(sources, "_probe_hub", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)


@pytest.mark.parametrize("source", ["hn-titles", "arxiv-abstracts"])
def test_hub_download_offline_is_a_data_error(monkeypatch, source):
    _offline_datasets(monkeypatch)
    with pytest.raises(DataError) as e:
        load_documents(DataConfig(source=source))
    msg = str(e.value)
    assert f"cannot download {source}" in msg and "no network" in msg and "data.path=" in msg


def test_hub_probe_fails_fast_offline(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_dns)
    with pytest.raises(DataError, match=r"no network: gaierror.*data\.path="):
        load_documents(DataConfig(source="hn-titles"))


def test_shakespeare_download_offline_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "_fetch", offline)
    with pytest.raises(DataError) as e:
        load_documents(DataConfig(source="shakespeare"))
    assert str(e.value).startswith("cannot download shakespeare (no network: [Errno -2]")
    assert "data.path=/path/to/input.txt" in str(e.value)


def test_shakespeare_wrong_file_is_rejected(tmp_path):
    p = tmp_path / "input.txt"
    p.write_text("First Citizen:\nNot the real file.\n")
    with pytest.raises(DataError, match="sha256"):
        load_documents(DataConfig(source="shakespeare", path=str(p)))


def _real_shakespeare() -> bytes:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared tinyshakespeare copy not found at {SHAKESPEARE} (../shared/data beside the checkout)")
    return gzip.decompress(SHAKESPEARE.read_bytes())


def test_shakespeare_real_local_copy():
    text = _real_shakespeare().decode("utf-8")
    result = load_documents(DataConfig(source="shakespeare", path=str(SHAKESPEARE)))
    assert result.info["md5"] == sources.SHAKESPEARE_MD5 and result.info["checksum_ok"]
    assert result.docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert result.docs[1] == "All:\nSpeak, speak."
    assert len(result.docs) == 7222 and all(d and "\n\n" not in d for d in result.docs)
    # documents + blank-line separators rebuild the file (which has two doubled blank lines)
    assert "\n\n".join(result.docs) + "\n" == text.replace("\n\n\n", "\n\n")


def test_shakespeare_download_is_cached_and_verified(monkeypatch, tmp_path):
    raw = _real_shakespeare()
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(sources, "_fetch", lambda url, timeout: calls.append(url) or raw)
    first = load_documents(DataConfig(source="shakespeare"))
    second = load_documents(DataConfig(source="shakespeare"))
    assert calls == [sources.SHAKESPEARE_URL] and first.docs == second.docs
    assert (tmp_path / "shakespeare" / "input.txt").read_bytes() == raw
    # a corrupted download is refused and not cached
    (tmp_path / "shakespeare" / "input.txt").unlink()
    monkeypatch.setattr(sources, "_fetch", lambda url, timeout: raw[:-1])
    with pytest.raises(DataError, match="wrong sha256"):
        load_documents(DataConfig(source="shakespeare"))
    assert not (tmp_path / "shakespeare" / "input.txt").exists()


def test_hn_titles_real_first_2000(tmp_path):
    p, titles = first_hn_titles(tmp_path / "titles.txt")
    result = load_documents(DataConfig(source="hn-titles", path=str(p)))
    assert result.docs == [t.strip() for t in titles if t.strip()]
    assert len(result.docs) == 2000
