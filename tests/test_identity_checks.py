"""What a run depends on is recorded and checked: its dataset, tokenizer, block layout and config.

Resume, eval and sample refuse (one line, naming what differs and how to point
at the right data) instead of silently using other data; prepared metadata and
checkpoint markers that were tampered with give one line, never a traceback.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab import cli, config
from attnlab.data import store
from attnlab.errors import CheckpointError, ConfigError, DataError, UserError
from attnlab.files import file_sha256
from attnlab.run.open import load_run
from attnlab.training import checkpoint as ckpt
from attnlab.training.trainer import train
from runkit import crash_after_step, tiny_config, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def cfg_for(tmp_path, corpus, *overrides, name="t"):
    return tiny_config(corpus, tmp_path / "data", tmp_path / "runs", *overrides, name=name)


def crashed_run(cfg, monkeypatch, at_step: int = 3) -> Path:
    """Train until step `at_step` (checkpoints every 2 steps), then crash: a run to resume."""
    crash_after_step(monkeypatch, at_step, lambda: train(cfg))
    return Path(cfg.out_dir) / cfg.name


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def val_bpb(run) -> float:
    from attnlab.eval.metrics import score_tokens, text_metrics

    score = score_tokens(run.model, run.dataset.tokens("val"), context=run.cfg.model.context, device=run.device)
    return text_metrics(score, run.dataset.meta["splits"]["val"])["bits_per_byte"]


def cli_error(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("attnlab: error: ") and "Traceback" not in "\n".join(err)
    return code, err[-1]


# --------------------------------------------------- 4, 15: the run's dataset


def test_the_run_records_its_dataset_identity_and_absolute_paths(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(
        config.load(
            None,
            [
                f"data.source={corpus.name}",
                "data.format=lines",
                "data.tokenizer=bytes",
                "out_dir=runs",
                "model.n_layer=1",
                "model.n_head=2",
                "model.d_model=16",
                "model.context=16",
                "train.batch_size=2",
                "train.max_steps=1",
                "logging.progress=false",
            ],
        )
    )
    run = tmp_path / "runs" / "run"
    saved = config.load(run / "config.yaml")
    assert saved.data.dir is None and saved.data.source == corpus.name  # config.yaml keeps what was given
    ident = json.loads((run / "identity.json").read_text())
    data = next((tmp_path / "data").iterdir())
    assert ident["dataset"]["dir"] == str(data) and ident["dataset"]["settings"]["source"] == str(corpus)
    assert ident["dataset"]["files"] == {n: file_sha256(data / n) for n in ("train.bin", "val.bin", "tokenizer.json")}
    assert ident["config"]["sha256"] == file_sha256(run / "config.yaml")


def test_resume_refuses_a_dataset_rebuilt_from_a_changed_source(tmp_path, corpus, monkeypatch):
    run = crashed_run(cfg_for(tmp_path, corpus, "train.checkpoint_every=2"), monkeypatch)
    shutil.rmtree(tmp_path / "data")
    write_corpus(corpus, seed=1)  # the source changed since the run started
    with pytest.raises(DataError) as e:
        train(resume=run)
    msg = one_line(e)
    assert f"dataset {tmp_path / 'data'} (rebuilt from data.source=" in msg
    assert "train.bin" in msg and "val.bin" in msg and "data.dir=" in msg and "config" not in msg.split(":")[0]


def test_resume_rebuilds_a_deleted_dataset_when_it_matches(tmp_path, corpus, monkeypatch):
    full = train(cfg_for(tmp_path, corpus, "train.checkpoint_every=2", "train.max_steps=4", name="full"))
    run = crashed_run(cfg_for(tmp_path, corpus, "train.checkpoint_every=2", "train.max_steps=4"), monkeypatch)
    shutil.rmtree(tmp_path / "data")
    assert train(resume=run)["val_bits_per_byte"] == full["val_bits_per_byte"]


def test_resume_blames_changed_data_not_the_config(tmp_path, corpus, monkeypatch):
    run = crashed_run(cfg_for(tmp_path, corpus, "train.checkpoint_every=2"), monkeypatch)
    other = write_corpus(tmp_path / "other.txt", seed=5)
    store.prepare(
        config.DataConfig(source=str(other), format="lines", tokenizer="char", val_frac=0.1, seed=1),
        tmp_path / "data",
        force=True,
        progress=False,
    )
    with pytest.raises(DataError) as e:
        train(resume=run)
    msg = one_line(e)
    assert msg.startswith(f"dataset {tmp_path / 'data'} is not the one {run} was trained on")
    assert "tokenizer.json" in msg and "different model" not in msg and "changed config" not in msg


def test_resume_can_point_at_a_moved_copy_of_the_data(tmp_path, corpus, monkeypatch):
    run = crashed_run(cfg_for(tmp_path, corpus, "train.checkpoint_every=2"), monkeypatch)
    (tmp_path / "data").rename(tmp_path / "moved")
    assert train(resume=run, data_dir=tmp_path / "moved")["steps"] == 8
    assert not (tmp_path / "data").exists()


def test_a_relative_source_does_not_tie_the_run_to_the_current_directory(tmp_path, corpus, monkeypatch):
    (tmp_path / "a").mkdir()
    shutil.copy(corpus, tmp_path / "a" / "corpus.txt")
    monkeypatch.chdir(tmp_path / "a")
    rel = ["data.source=corpus.txt", "data.dir=data", "out_dir=runs", "train.checkpoint_every=2"]
    full = train(cfg_for(tmp_path, corpus, *rel, name="full"))
    run = crashed_run(cfg_for(tmp_path, corpus, *rel), monkeypatch).resolve()
    shutil.rmtree(tmp_path / "a" / "data")
    (tmp_path / "b").mkdir()
    write_corpus(tmp_path / "b" / "corpus.txt", seed=9)  # another file of that name where resume is started
    monkeypatch.chdir(tmp_path / "b")
    assert train(resume=run)["val_bits_per_byte"] == full["val_bits_per_byte"]
    assert not (tmp_path / "b" / "data").exists()


def test_cli_resume_takes_data_dir(tmp_path, corpus, monkeypatch, capsys):
    run = crashed_run(cfg_for(tmp_path, corpus, "train.checkpoint_every=2"), monkeypatch)
    (tmp_path / "data").rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), f"data.dir={tmp_path / 'moved'}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 8


def test_eval_refuses_a_changed_dataset(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    shutil.rmtree(tmp_path / "data")
    write_corpus(corpus, seed=1)
    store.prepare(cfg_for(tmp_path, corpus).data, tmp_path / "data", progress=False)
    with pytest.raises(DataError) as e:
        load_run(tmp_path / "runs" / "t")
    msg = one_line(e)
    assert "is not the one" in msg and "train.bin" in msg and "--data-dir" in msg


def test_eval_of_a_copied_run_never_prepares_into_the_current_directory(tmp_path, corpus, monkeypatch):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    copy = tmp_path / "elsewhere" / "t"
    shutil.copytree(tmp_path / "runs" / "t", copy)
    monkeypatch.chdir(tmp_path / "elsewhere")
    before = val_bpb(load_run(copy))  # the recorded (absolute) dataset is found from any directory
    (tmp_path / "data").rename(tmp_path / "moved")
    with pytest.raises(DataError) as e:
        load_run(copy)
    msg = one_line(e)
    assert f"dataset {tmp_path / 'data'} of {copy} is missing" in msg and "--data-dir" in msg
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["t"]  # nothing prepared here
    assert val_bpb(load_run(copy, data_dir=tmp_path / "moved")) == before


def test_eval_cli_takes_data_dir(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    (tmp_path / "data").rename(tmp_path / "moved")
    code, line = cli_error(capsys, "eval", tmp_path / "runs" / "t")
    assert code == DataError.exit_code and "--data-dir" in line
    assert cli.main(["eval", str(tmp_path / "runs" / "t"), "--data-dir", str(tmp_path / "moved")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_bits_per_byte"] > 0


# ------------------------------------------------------------- 5: the layout


def layout_cfg(tmp_path, corpus, layout: Path, *overrides, name="t"):
    return cfg_for(
        tmp_path,
        corpus,
        "attention.pattern=block_layout",
        f"attention.layout={layout}",
        "attention.layout_block=8",
        *overrides,
        name=name,
    )


def test_the_layout_is_copied_into_the_run_and_edits_are_detected(tmp_path, corpus, monkeypatch):
    layout = tmp_path / "layout.npy"
    np.save(layout, np.tril(np.ones((4, 4), dtype=bool)))
    run = crashed_run(layout_cfg(tmp_path, corpus, layout, "train.checkpoint_every=2"), monkeypatch)
    copy = run / "attention_layout.npy"
    assert copy.read_bytes() == layout.read_bytes()
    before = val_bpb(load_run(run))
    np.save(layout, np.eye(4, dtype=bool))  # editing the original changes nothing: the run reads its copy
    assert load_run(run).cfg.attention.layout == str(copy)
    assert val_bpb(load_run(run)) == before
    np.save(copy, np.eye(4, dtype=bool))  # editing the copy is detected
    for action in (lambda: load_run(run), lambda: train(resume=run)):
        with pytest.raises(CheckpointError) as e:
            action()
        msg = one_line(e)
        assert str(copy) in msg and "changed after the run started" in msg


def test_resume_with_the_original_layout_config_is_not_a_change(tmp_path, corpus, monkeypatch):
    layout = tmp_path / "layout.npy"
    np.save(layout, np.tril(np.ones((4, 4), dtype=bool)))
    cfg = layout_cfg(tmp_path, corpus, layout, "train.checkpoint_every=2")
    run = crashed_run(cfg, monkeypatch)
    assert train(layout_cfg(tmp_path, corpus, layout, "train.checkpoint_every=2"), resume=run)["steps"] == 8
    run2 = crashed_run(layout_cfg(tmp_path, corpus, layout, "train.checkpoint_every=2", name="u"), monkeypatch)
    np.save(layout, np.eye(4, dtype=bool))
    with pytest.raises(CheckpointError, match="attention.layout.*content differs"):
        train(layout_cfg(tmp_path, corpus, layout, "train.checkpoint_every=2", name="u"), resume=run2)


# --------------------------------------------------------- 8: config and meta


def test_zero_epochs_is_refused():
    with pytest.raises(ConfigError, match=r"train.epochs=0.0 trains no step: use train.epochs > 0"):
        config.load(None, ["train.epochs=0"])


def test_an_edited_run_config_is_detected(tmp_path, corpus, monkeypatch):
    run = crashed_run(cfg_for(tmp_path, corpus, "train.checkpoint_every=2"), monkeypatch)
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("max_steps: 8", "max_steps: 9"))
    for action in (lambda: train(resume=run), lambda: load_run(run)):
        with pytest.raises(CheckpointError) as e:
            action()
        msg = one_line(e)
        assert f"{path} was edited after the run started" in msg and "name=" in msg


@pytest.fixture
def prepared(tmp_path, corpus):
    out = tmp_path / "ds"
    store.prepare(
        config.DataConfig(source=str(corpus), format="lines", tokenizer="bpe", vocab_size=280, seed=1),
        out,
        progress=False,
    )
    return out


def edit_meta(ds: Path, change) -> None:
    meta = json.loads((ds / "meta.json").read_text())
    change(meta)
    (ds / "meta.json").write_text(json.dumps(meta))


def load_err(ds: Path) -> str:
    with pytest.raises(DataError) as e:
        store.load(ds)
    return one_line(e)


def test_tokenizer_hash_is_recorded_and_checked(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == file_sha256(prepared / "tokenizer.json")
    tok = json.loads((prepared / "tokenizer.json").read_text())
    (prepared / "tokenizer.json").write_text(json.dumps(tok, indent=1))  # same vocabulary size, other bytes
    assert "tokenizer.json does not match meta.json (sha256 differs)" in load_err(prepared)


@pytest.mark.parametrize("where", ["split", "tokenizer"])
def test_meta_file_entries_outside_the_folder_are_refused(prepared, where):
    shutil.copy(prepared / "train.bin", prepared.parent / "outside.bin")

    def change(meta):
        if where == "split":
            meta["splits"]["train"]["file"] = "../outside.bin"
        else:
            meta["tokenizer"]["file"] = str(prepared / "tokenizer.json")

    edit_meta(prepared, change)
    msg = load_err(prepared)
    assert "names a file outside the dataset folder" in msg and "meta.json" in msg


# ---------------------------------------------- 11: structurally tampered data


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda m: m.update(vocab_size="abc"), "vocab_size 'abc' is not a positive integer"),
        (lambda m: m["splits"]["train"].pop("tokens"), "train split has no 'tokens'"),
        (lambda m: m["splits"].update(val="val.bin"), "val split is not an object"),
        (lambda m: m["splits"]["train"].update(tokens="many"), "train split's 'tokens' 'many' is not"),
        (lambda m: m.update(format_version="1"), "format_version '1'"),
        (lambda m: m["splits"]["val"].pop("documents"), "val split's 'documents' None is not a count"),
        (lambda m: m["splits"]["val"].update(chars=-3), "val split's 'chars' -3 is not a count"),
    ],
)
def test_structurally_tampered_meta_is_one_line(prepared, change, needle):
    edit_meta(prepared, change)
    assert needle in load_err(prepared)


def test_token_ids_beyond_the_vocabulary_are_refused_when_opened(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    ids = np.fromfile(prepared / "train.bin", dtype=np.uint16)
    ids[len(ids) // 2] = meta["vocab_size"] + 7
    ids.tofile(prepared / "train.bin")
    edit_meta(prepared, lambda m: m["splits"]["train"].update(sha256=file_sha256(prepared / "train.bin")))  # re-signed
    msg = load_err(prepared)
    assert f"holds token id {meta['vocab_size'] + 7}" in msg and f"vocab_size {meta['vocab_size']}" in msg


def test_checkpoint_marker_with_a_string_format_is_one_line(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    step = ckpt.latest_checkpoint(tmp_path / "runs" / "t")
    marker = json.loads((step / "COMPLETE").read_text())
    marker["format"] = "1"
    (step / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(step)
    assert "unreadable COMPLETE marker" in one_line(e)


def test_events_with_invalid_utf8_are_one_line(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    events = tmp_path / "runs" / "t" / "events.jsonl"
    events.write_bytes(events.read_bytes() + b'{"event": "x\xff\xfe"}\n')
    code, line = cli_error(capsys, "report", tmp_path / "runs" / "t", "--out", tmp_path / "rep")
    assert code == CheckpointError.exit_code and f"{events} line" in line and "not valid UTF-8" in line


def test_an_npz_layout_is_one_line(tmp_path):
    np.savez(tmp_path / "layout.npz", layout=np.ones((4, 4), dtype=bool))
    with pytest.raises(ConfigError) as e:
        config.load(
            None, ["train.max_steps=1", "attention.pattern=block_layout", f"attention.layout={tmp_path / 'layout.npz'}"]
        )
    assert "is an .npz archive, not a .npy array" in one_line(e)


# ------------------------------------------------------------- 12: bad inputs


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, corpus):
    cfg = cfg_for(tmp_path, corpus, "model.d_model=65536", "model.n_head=256")
    with pytest.raises(ConfigError) as e:
        train(cfg)
    msg = one_line(e)
    assert "parameters" in msg and "GB" in msg and "available" in msg and "model.d_model" in msg
    assert not (tmp_path / "runs" / "t").exists()


def test_memory_estimate_counts_the_real_parameters(tmp_path, corpus):
    from attnlab.model.gpt import GPT
    from attnlab.training.memory import estimate

    cfg = cfg_for(tmp_path, corpus)
    est = estimate(cfg, 259, training=True)
    assert est.params == GPT(cfg.model, cfg.attention, 259).num_params()
    assert est.bytes >= est.params * 16  # weights, gradients and AdamW's two moments in float32


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval", "RUN", "--device", "banana"], "--device 'banana'"),
        (["eval", "RUN", "--batch-size", "0"], "--batch-size 0"),
        (["eval", "RUN", "--batch-size", "-4"], "--batch-size -4"),
        (["eval", "RUN", "--context", "0"], "--context 0"),
        (["eval", "RUN", "--stride", "0"], "--stride 0"),
        (["sample", "RUN", "--batch-size", "-3"], "--batch-size -3"),
        (["sample", "RUN", "--device", "banana"], "--device 'banana'"),
        (["bench", "train", "CFG", "--steps", "0"], "--steps 0"),
        (["bench", "train", "CFG", "--repeats", "0"], "--repeats 0"),
    ],
)
def test_bad_numbers_and_devices_are_refused_not_replaced(tmp_path, capsys, argv, needle):
    code, line = cli_error(capsys, *[str(tmp_path / a) if a in ("RUN", "CFG") else a for a in argv])
    assert code == UserError.exit_code and needle in line


def test_image_eval_batch_size_zero_is_refused(tmp_path, capsys):
    from runkit import digits_config

    cfg = digits_config(tmp_path)
    train(cfg)
    for b in ("0", "-3"):
        code, line = cli_error(capsys, "eval", tmp_path / "runs" / "digits", "--batch-size", b)
        assert code == UserError.exit_code and f"--batch-size {b}" in line


def test_sampling_a_diverged_model_is_one_line(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.max_steps=1"))
    run = load_run(tmp_path / "runs" / "t")
    with torch.no_grad():
        for p in run.model.parameters():
            p.mul_(1e30)  # finite weights whose logits overflow, as after a divergence
    from attnlab.eval import sample_text

    with pytest.raises(CheckpointError) as e:
        sample_text(run.model, run.dataset.tokenizer, "the", 5, device=run.device)
    assert "not finite" in one_line(e) and "diverged" in str(e.value)


# ----------------------------------------------------- 18: reusing a dataset


def test_data_dir_alone_takes_the_prepared_settings(tmp_path, corpus):
    ds = tmp_path / "prep"
    store.prepare(
        config.DataConfig(source=str(corpus), format="lines", tokenizer="char", val_frac=0.2, seed=3),
        ds,
        progress=False,
    )
    cfg = config.load(
        None,
        [
            f"data.dir={ds}",
            f"out_dir={tmp_path / 'runs'}",
            "model.n_layer=1",
            "model.n_head=2",
            "model.d_model=16",
            "model.context=16",
            "train.batch_size=2",
            "train.max_steps=1",
            "logging.progress=false",
        ],
    )
    train(cfg)
    saved = config.load(tmp_path / "runs" / "run" / "config.yaml").data
    assert (saved.source, saved.format, saved.tokenizer, saved.val_frac, saved.seed) == (
        str(corpus),
        "lines",
        "char",
        0.2,
        3,
    )


def test_conflicting_data_keys_are_listed_in_one_line(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=1"))
    with pytest.raises(DataError) as e:
        train(
            cfg_for(
                tmp_path,
                corpus,
                "train.max_steps=1",
                "data.val_frac=0.2",
                "data.seed=9",
                "data.tokenizer=char",
                name="other",
            )
        )
    msg = one_line(e)
    assert "prepared with data.seed=1, data.tokenizer='bytes', data.val_frac=0.1" in msg
    assert "the config says data.seed=9, data.tokenizer='char', data.val_frac=0.2" in msg
    assert not (tmp_path / "runs" / "other").exists()


@pytest.mark.parametrize("key", ["data.path", "data.source"])
def test_a_prepared_folder_as_a_source_says_use_data_dir(tmp_path, corpus, monkeypatch, key):
    store.prepare(cfg_for(tmp_path, corpus).data, tmp_path / "prep", progress=False)
    monkeypatch.chdir(tmp_path)
    source = ["data.source=hn-titles", "data.path=prep"] if key == "data.path" else ["data.source=prep"]
    cfg = config.load(
        None,
        [
            *source,
            "model.n_layer=1",
            "model.n_head=2",
            "model.d_model=16",
            "model.context=16",
            "train.max_steps=1",
            "logging.progress=false",
        ],
    )
    with pytest.raises(DataError) as e:
        train(cfg)
    assert f"{key}='prep' is a prepared dataset: use data.dir=prep" in one_line(e)
    assert not (tmp_path / "data").exists()


def test_prepare_names_the_flag_the_user_typed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, line = cli_error(capsys, "prepare", "hn-titles", "--path", "nope.txt", "--out", "d")
    assert code == DataError.exit_code and "--path 'nope.txt'" in line and "data.path" not in line
    code, line = cli_error(capsys, "prepare", "hn-titles", "--vocab-size", "3", "--out", "d")
    assert code == ConfigError.exit_code and "--vocab-size 3 is out of range" in line
    assert not (tmp_path / "d").exists() and not (tmp_path / "data").exists()
