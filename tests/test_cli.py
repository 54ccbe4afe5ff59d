"""The command line: bad input gives one line, a non-zero exit code and no traceback."""

import json
import subprocess
import sys

import pytest

from runkit import write_corpus

CLI = [sys.executable, "-m", "attnlab"]


def run(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(p, code, *needles):
    assert p.returncode == code, p.stderr
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and lines, p.stderr
    assert lines[-1].startswith("attnlab: error: ")
    for n in needles:
        assert n in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the CLI tests (prepare + train + checkpoint)."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(tmp / "corpus.txt", n_docs=200)
    p = run(
        "prepare",
        corpus,
        "--out",
        tmp / "data",
        "--format",
        "lines",
        "--tokenizer",
        "bpe",
        "--vocab-size",
        300,
        "--val-frac",
        0.1,
        "--seed",
        1,
    )
    assert p.returncode == 0, p.stderr
    common = [
        f"data.source={corpus}",
        "data.format=lines",
        "data.tokenizer=bpe",
        "data.vocab_size=300",
        "data.val_frac=0.1",
        "data.seed=1",
        f"data.dir={tmp / 'data'}",
        f"out_dir={tmp / 'runs'}",
        "model.n_layer=1",
        "model.n_head=2",
        "model.d_model=32",
        "model.context=32",
        "train.batch_size=4",
        "logging.progress=false",
    ]
    p = run("train", "name=a", "train.max_steps=3", *common)
    assert p.returncode == 0, p.stderr
    return tmp, common


def test_train_prints_summary_json(trained):
    tmp, _ = trained
    s = json.loads((tmp / "runs" / "a" / "summary.json").read_text())
    assert s["steps"] == 3 and s["val_bits_per_byte"] > 0


def test_eval_last_line_is_json_and_batch_independent(trained):
    tmp, _ = trained
    outs = [
        json.loads(run("eval", tmp / "runs" / "a", "--batch-size", b, "--stride", 16).stdout.strip().splitlines()[-1])
        for b in (1, 5)
    ]
    assert outs[0]["val_bits_per_byte"] == outs[1]["val_bits_per_byte"]
    assert outs[0]["tokens_scored"] == outs[1]["tokens_scored"]
    assert all(k.isidentifier() for k in outs[0]) and outs[0]["mainrun_val_loss"] > 0  # plain JSON keys


def test_eval_mainrun_exact_applies_the_challenges_window_rule(trained):
    tmp, _ = trained
    out = json.loads(run("eval", tmp / "runs" / "a", "--mainrun-exact").stdout.strip().splitlines()[-1])
    meta = json.loads((tmp / "data" / "meta.json").read_text())["splits"]["val"]
    targets, span = meta["tokens"] - 1, 4 * 32 + 1  # the run's train.batch_size * model.context + 1
    assert out["mainrun_exact_tokens_scored"] == targets // span * 4 * 32 > 0
    assert out["mainrun_exact_val_coverage"] == out["mainrun_exact_tokens_scored"] / targets
    chars = meta["chars"] + 5 * meta["documents"]  # the whole split's "<eos>"-joined text
    assert out["mainrun_val_loss"] * chars == pytest.approx(out["val_nats_per_token"] * out["tokens_scored"])
    assert out["mainrun_exact_val_loss"] > 0 and "4*32+1" in out["mainrun_exact_rule"]
    assert "tokenizer_fit" not in out  # the tokenizer was fit on the training documents only


def test_sample_is_reproducible_with_seed(trained):
    tmp, _ = trained

    def sample(seed):
        args = ["--prompt", "the", "--max-new-tokens", 20, "--seed", seed, "--num-samples", 2, "--top-k", 20]
        return run("sample", tmp / "runs" / "a", *args)

    a, b, c = sample(3), sample(3), sample(4)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stdout.count("--- sample") == 2


def test_bad_config_key_and_value(trained):
    tmp, common = trained
    assert_one_line_error(run("train", "name=x", "model.n_layr=2", *common), 2, "did you mean model.n_layer?")
    assert_one_line_error(run("train", "name=x", "optim.lr=-1", *common), 2, "optim.lr", "[0.0, 10.0]")
    assert not (tmp / "runs" / "x").exists()


def test_missing_and_empty_data_path(tmp_path):
    assert_one_line_error(run("prepare", tmp_path / "nope.txt", "--out", tmp_path / "d"), 3, "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(run("prepare", tmp_path / "empty.txt", "--out", tmp_path / "d"), 3, "empty.txt")
    assert not (tmp_path / "d").exists()


def test_corrupted_dataset(trained, tmp_path):
    tmp, common = trained
    import shutil

    bad = tmp_path / "data"
    shutil.copytree(tmp / "data", bad)
    raw = bytearray((bad / "val.bin").read_bytes())
    raw[3] ^= 0xFF
    (bad / "val.bin").write_bytes(bytes(raw))
    args = [c if not c.startswith("data.dir=") else f"data.dir={bad}" for c in common]
    assert_one_line_error(run("train", "name=y", "train.max_steps=1", *args), 3, "val.bin")


def test_existing_run_dir_is_not_overwritten(trained):
    tmp, common = trained
    before = (tmp / "runs" / "a" / "summary.json").read_text()
    assert_one_line_error(run("train", "name=a", "train.max_steps=1", *common), 4, "already exists", "--force")
    assert (tmp / "runs" / "a" / "summary.json").read_text() == before


def test_resume_with_changed_config(trained):
    tmp, common = trained
    p = run("train", "name=a", "train.max_steps=3", *common, "model.n_layer=2", "--resume", tmp / "runs" / "a")
    assert_one_line_error(p, 2, "--resume takes no overrides (model.n_layer=2 given)")


def test_checkpoint_from_other_model_shape(trained):
    tmp, common = trained
    assert run("train", "name=b", "train.max_steps=1", *common, "model.d_model=48").returncode == 0
    other = next((tmp / "runs" / "b" / "checkpoints").glob("step_*"))
    assert_one_line_error(run("eval", tmp / "runs" / "a", "--checkpoint", other), 4, "different model")


def test_debug_shows_traceback(trained):
    tmp, common = trained
    p = run("--debug", "train", "name=x", "model.n_layr=2", *common)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_ctrl_c_saves_between_steps_and_resume_matches(tmp_path):
    """SIGINT mid-run: exit 130, a consistent checkpoint, and --resume reaches the uninterrupted weights."""
    import signal
    import time

    import torch

    from attnlab.training import checkpoint as ckpt

    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=200)
    common = [
        f"data.source={corpus}",
        "data.format=lines",
        "data.tokenizer=bytes",
        f"data.dir={tmp_path / 'data'}",
        f"out_dir={tmp_path / 'runs'}",
        "model.n_layer=1",
        "model.n_head=2",
        "model.d_model=32",
        "model.context=32",
        "model.dropout=0.1",
        "train.batch_size=4",
        "train.max_steps=150",
        "logging.progress=false",
        "logging.log_every=1",
    ]
    assert run("train", "name=full", *common).returncode == 0
    p = subprocess.Popen(CLI + ["train", "name=cut", *common], stderr=subprocess.PIPE, text=True)
    events = tmp_path / "runs" / "cut" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (events.exists() and events.read_text().count('"training_step"') >= 5):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "--resume" in err and "Traceback" not in err
    cut_at = ckpt.latest_checkpoint(tmp_path / "runs" / "cut")
    assert cut_at is not None and int(cut_at.name.split("_")[1]) < 150
    assert run("train", "--resume", tmp_path / "runs" / "cut").returncode == 0
    wa, _ = ckpt.load_checkpoint(tmp_path / "runs" / "full")
    wb, _ = ckpt.load_checkpoint(tmp_path / "runs" / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_bad_fixed_setting_names_each_rule_and_the_nearest_valid_one(tmp_path):
    overrides = [
        "attention.pattern=fixed",
        "attention.num_verts=16",
        "attention.local_attn_ctx=32",
        "attention.blocksize=32",
        "attention.vertsize=64",
        f"out_dir={tmp_path / 'runs'}",
        f"data.dir={tmp_path / 'data'}",
    ]
    p = run("train", "configs/mainrun.yaml", *overrides)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert [line.split(":")[0].split("=")[0] for line in lines] == [
        "attnlab",  # attnlab: error: attention.vertsize*num_verts=... exceeds ...
        "attention.num_verts",
        "nearest valid setting",
    ]
    assert lines[0].startswith("attnlab: error: attention.vertsize*num_verts=64*16=1024 exceeds the 1 block per chunk")
    assert lines[-1] == (
        "nearest valid setting: attention.local_attn_ctx=32 attention.blocksize=4 attention.vertsize=1 "
        "attention.num_verts=8"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # nothing ran


def test_prepare_tokenizer_fit_train_val_warns_and_records(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=60)
    args = ["prepare", corpus, "--out", tmp_path / "data", "--format", "lines", "--vocab-size", 300]
    p = run(*args, "--tokenizer-fit", "train+val")
    assert p.returncode == 0, p.stderr
    assert "attnlab: warning: data.tokenizer_fit=train+val" in p.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["data_config"]["tokenizer_fit"] == "train+val"
    bad = run(*args[:3], tmp_path / "other", "--tokenizer-fit", "val")
    assert_one_line_error(bad, 2, "--tokenizer-fit", "train+val")
