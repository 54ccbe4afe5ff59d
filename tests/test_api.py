"""The Python API (attnlab.load / attnlab.train): the same numbers, samples and logits as the command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnlab
from attnlab import api, cli, config
from attnlab.errors import ConfigError, DataError, UserError
from attnlab.training import python_api
from runkit import tiny_config, write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A tiny BPE run trained through attnlab.train: a Config plus overrides of both spellings."""
    tmp = tmp_path_factory.mktemp("api")
    corpus = write_corpus(tmp / "corpus.txt", n_docs=200)
    cfg = tiny_config(corpus, tmp / "data", tmp / "runs", name="base")
    summary = attnlab.train(
        cfg, name="api", data={"tokenizer": "bpe", "vocab_size": 300}, **{"train.max_steps": 4, "model.n_layer": 1}
    )
    return tmp / "runs" / "api", summary, cfg


def cli_out(capsys, *args) -> str:
    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_train_applies_overrides_and_leaves_the_config_alone(trained):
    run_dir, summary, cfg = trained
    assert summary["steps"] == 4
    saved = attnlab.load(run_dir).config
    assert (saved.name, saved.model.n_layer, saved.data.tokenizer, saved.data.vocab_size) == ("api", 1, "bpe", 300)
    assert (cfg.name, cfg.model.n_layer, cfg.data.tokenizer) == ("base", 2, "bytes")  # the given Config is unchanged


def test_override_spellings_mean_the_same_keys():
    nested = config.flatten({"model": {"n_layer": 2, "position": "rope"}, "name": "x"})
    dotted = config.flatten({"model.n_layer": 2, "model.position": "rope", "name": "x"})
    assert nested == dotted == {"model.n_layer": 2, "model.position": "rope", "name": "x"}
    assert [python_api._as_text(v) for v in (True, None, [1, 2], [], 3e-4)] == ["true", "none", "1,2", "[]", "0.0003"]
    assert python_api._as_text([{"pattern": "local", "window": 8}]) == "[{pattern: local, window: 8}]"


def test_train_from_a_yaml_path_with_a_bad_key_names_it(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  n_layer: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.n_layr'"):
        attnlab.train(preset, **{"model.n_layr": 2})


@pytest.mark.parametrize("flags", [[], ["--stride", "16"], ["--context", "24", "--batch-size", "3"]])
def test_evaluate_equals_attnlab_eval(trained, capsys, flags):
    run_dir, _, _ = trained
    shell = json.loads(cli_out(capsys, "eval", run_dir, *flags).strip().splitlines()[-1])
    kw = {f.lstrip("-").replace("-", "_"): int(v) for f, v in zip(flags[::2], flags[1::2])}
    m = attnlab.load(run_dir).evaluate(split="val", **kw)
    assert m["bits_per_byte"] == shell["val_bits_per_byte"]
    assert m["nats_per_token"] == shell["val_nats_per_token"] and m["perplexity"] == shell["val_perplexity"]
    assert (m["tokens"], m["bytes"], m["context"], m["stride"]) == (
        shell["tokens_scored"],
        shell["bytes"],
        shell["context"],
        shell["stride"],
    )


def test_evaluate_default_is_the_trainers_final_number(trained):
    run_dir, summary, _ = trained
    assert attnlab.load(run_dir).evaluate()["bits_per_byte"] == summary["val_bits_per_byte"]


def test_evaluate_text_of_a_splits_documents_equals_the_split(trained):
    run = attnlab.load(trained[0])
    ids = run.dataset.tokens("val").tolist()
    eos = run.tokenizer.eos_id
    cuts = [i for i, t in enumerate(ids) if t == eos]
    docs = [run.tokenizer.decode(ids[a + 1 : b]) for a, b in zip(cuts, cuts[1:])]
    assert len(docs) == run.dataset.meta["splits"]["val"]["documents"]
    by_text, by_split = run.evaluate(text=docs, stride=16), run.evaluate("val", stride=16)
    for key in ("bits_per_byte", "nats_per_token", "mainrun_loss", "tokens", "bytes", "chars"):
        assert by_text[key] == by_split[key], key
    one = run.evaluate(text=docs[0])
    assert one["tokens"] == len(run.tokenizer.encode(docs[0])) + 1 and one["bytes"] == len(docs[0].encode())


def test_generate_equals_attnlab_sample_and_is_seeded(trained, capsys):
    run_dir, _, _ = trained
    run = attnlab.load(run_dir)
    shell = cli_out(capsys, "sample", run_dir, "--prompt", "the", "--max-new-tokens", 20, "--seed", 3, "--top-k", 20)
    text = run.generate("the", 20, seed=3, top_k=20)
    assert shell == text + "\n" and text.startswith("the")
    assert run.generate("the", 20, seed=3, top_k=20) == text
    assert run.generate("the", 20, seed=4, temperature=1.0) != run.generate("the", 20, seed=5, temperature=1.0)
    stopped = cli_out(capsys, "sample", run_dir, "--prompt", "the", "--max-new-tokens", 30, "--seed", 3, "--stop", "e ")
    assert (
        stopped
        == run.generate("the", 30, seed=3, stop="e ") + "\n"
        == run.generate("the", 30, seed=3, stop=["e "]) + "\n"
    )
    two = cli_out(capsys, "sample", run_dir, "--prompt", "a", "--max-new-tokens", 10, "--num-samples", 2, "--seed", 1)
    texts = run.generate("a", 10, num_samples=2, seed=1)
    assert two == "".join(f"--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts))


def test_greedy_generate_follows_the_logits(trained):
    run = attnlab.load(trained[0])
    text = run.generate("the model", 1, temperature=0, stop_at_eos=False)
    nxt = int(run.logits("the model")[-1].argmax())
    assert text == "the model" + run.tokenizer.decode([nxt])


def test_logits_equal_the_models_forward(trained):
    run = attnlab.load(trained[0])
    ids = run.encode("the sparse model")
    assert ids[0] == run.tokenizer.eos_id and ids[1:] == run.tokenizer.encode("the sparse model")
    logits = run.logits("the sparse model")
    with torch.no_grad():
        ref = run.model(torch.tensor([ids]))[0]
    assert logits.shape == (len(ids), run.model.vocab_size) and torch.equal(logits, ref)
    assert torch.equal(run.logits(ids), logits)


def test_bad_calls_say_what_to_do(trained):
    run = attnlab.load(trained[0])
    with pytest.raises(DataError, match="no 'test' split"):
        run.evaluate("test")
    with pytest.raises(UserError, match="a split or text"):
        run.evaluate("val", text="x")
    with pytest.raises(UserError, match=r"stride=40 is outside \[1, 32\]"):
        run.evaluate(stride=40)
    with pytest.raises(ConfigError, match="unknown sampling setting 'topk'"):
        run.generate("a", 5, topk=3)
    with pytest.raises(UserError, match="the model reads 1 to 32"):
        run.logits(list(np.zeros(33, dtype=int)))


def test_import_attnlab_is_light_and_exposes_the_api():
    code = "import sys, attnlab; print('torch' in sys.modules); t = attnlab.train; print(callable(t))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr  # the API is imported on first use
    assert attnlab.load is api.load and attnlab.Run is api.Run and attnlab.train is api.train
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = attnlab.nothing_here


def test_image_runs_evaluate_in_bits_per_dim_as_attnlab_eval(tmp_path, capsys, one_thread):
    from runkit import digits_config

    cfg = digits_config(tmp_path)
    summary = attnlab.train(cfg)
    run = attnlab.load(tmp_path / "runs" / "digits")
    shell = json.loads(cli_out(capsys, "eval", run.dir, "--split", "test").strip().splitlines()[-1])
    m = run.evaluate("test", batch_size=7)
    assert m["bits_per_dim"] == shell["test_bits_per_dim"] == summary["test_bits_per_dim"]
    assert (m["images"], m["dims_per_image"]) == (shell["images_scored"], 64) and run.tokenizer is None
    with pytest.raises(UserError, match="models images: generate is for text runs"):
        run.generate("x")
    with pytest.raises(UserError, match="context and stride apply to text"):
        run.evaluate("test", stride=4)


def test_evaluate_mainrun_exact_equals_attnlab_eval(trained, capsys):
    run_dir, _, _ = trained
    shell = json.loads(cli_out(capsys, "eval", run_dir, "--mainrun-exact").strip().splitlines()[-1])
    exact = attnlab.load(run_dir).evaluate_mainrun_exact()
    assert (exact["loss"], exact["coverage"], exact["tokens"]) == (
        shell["mainrun_exact_val_loss"],
        shell["mainrun_exact_val_coverage"],
        shell["mainrun_exact_tokens_scored"],
    )


def test_numbers_of_a_tokenizer_fit_on_val_say_so(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=100)
    cfg = tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "data.tokenizer=bpe", "data.vocab_size=300")
    attnlab.train(cfg, name="tv", **{"data.tokenizer_fit": "train+val", "train.max_steps": 1, "model.n_layer": 1})
    label = "train+val (the tokenizer saw the validation text)"
    assert attnlab.load(tmp_path / "runs" / "tv").evaluate()["tokenizer_fit"] == label
    assert (
        json.loads(cli_out(capsys, "eval", tmp_path / "runs" / "tv").strip().splitlines()[-1])["tokenizer_fit"] == label
    )
