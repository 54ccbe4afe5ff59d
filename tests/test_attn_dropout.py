"""Attention dropout apart from residual dropout: the default keeps old runs, 0 opens FlexAttention on GPUs."""

import pytest
import torch
import yaml

from attnlab import config
from attnlab.attention import flex as flex_mod
from attnlab.attention.backends import attention_dropout
from attnlab.errors import ConfigError
from attnlab.model.gpt import GPT
from attnlab.training import checkpoint as ckpt
from attnlab.training.logs import read_events
from attnlab.training.trainer import train
from runkit import crash_after_step, tiny_config, write_corpus

SPARSE = ["attention.pattern=strided", "attention.local_attn_ctx=8"]


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def cuda_flex(monkeypatch):
    """A CUDA device with Triton, as far as backend selection can tell (no GPU is touched)."""
    monkeypatch.setattr(flex_mod, "flex_available", lambda device=None: (True, ""))


def cfg_for(tmp_path, corpus, *overrides, name="t"):
    return tiny_config(corpus, tmp_path / "data", tmp_path / "runs", *overrides, name=name)


def backends_on_cuda(*overrides: str) -> list[str]:
    cfg = config.load(
        None,
        ["train.max_steps=1", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.context=32", *overrides],
    )
    return GPT(cfg.model, cfg.attention, 64).resolve_backends(torch.device("cuda"))


def test_default_follows_model_dropout():
    assert attention_dropout(config.ModelConfig(dropout=0.2)) == 0.2
    assert attention_dropout(config.ModelConfig(dropout=0.2, attn_dropout=0.0)) == 0.0
    assert attention_dropout(config.ModelConfig(dropout=0.0, attn_dropout=0.3)) == 0.3
    assert config.load(None, ["train.max_steps=1", "model.attn_dropout=none"]).model.attn_dropout is None


def test_residual_dropout_with_no_attention_dropout_selects_flex_on_cuda(cuda_flex):
    assert backends_on_cuda(*SPARSE, "model.dropout=0.25", "model.attn_dropout=0") == ["flex", "flex"]
    # Unset, attention dropout is model.dropout: flex cannot apply it, so a GPU runs blocksparse as before.
    assert backends_on_cuda(*SPARSE, "model.dropout=0.25") == ["blocksparse", "blocksparse"]
    assert backends_on_cuda(*SPARSE, "model.dropout=0", "model.attn_dropout=0.1") == ["blocksparse", "blocksparse"]
    assert backends_on_cuda("model.dropout=0.25") == ["sdpa", "sdpa"]  # dense: SDPA has dropout built in


def test_forced_flex_with_attention_dropout_names_the_key():
    with pytest.raises(
        ConfigError,
        match=r"attention.backend='flex' has no attention dropout but the model's is 0.1 "
        r".*or model.attn_dropout=0$",
    ):
        config.load(
            None, ["train.max_steps=1", "attention.backend=flex", "model.dropout=0.0", "model.attn_dropout=0.1"]
        )
    cfg = config.load(
        None, ["train.max_steps=1", "attention.backend=flex", "model.dropout=0.3", "model.attn_dropout=0"]
    )
    assert cfg.model.dropout == 0.3


def test_gpu_presets_run_their_sparse_patterns_through_flex(cuda_flex):
    for preset in ("cifar10-sparse-transformer", "cifar10-dense"):
        cfg = config.load(f"configs/{preset}.yaml", ["model.n_layer=2", "model.image_shape=32,32,3"])
        assert (cfg.model.dropout, cfg.model.attn_dropout) == (0.25, 0.0)
        chosen = set(GPT(cfg.model, cfg.attention, 257).resolve_backends(torch.device("cuda")))
        assert chosen == ({"flex"} if preset == "cifar10-sparse-transformer" else {"sdpa"})
    mainrun = config.load("configs/mainrun.yaml")
    assert attention_dropout(mainrun.model) == mainrun.model.dropout == 0.1  # the protocol is unchanged


def test_attention_dropout_acts_on_the_weights_alone(tmp_path, corpus):
    """dropout=0.1 with attn_dropout unset trains exactly as attn_dropout=0.1; attn_dropout=0 differs."""
    steps = ["train.max_steps=3"]
    unset = train(cfg_for(tmp_path, corpus, *steps, name="unset"))
    same = train(cfg_for(tmp_path, corpus, *steps, "model.attn_dropout=0.1", name="same"))
    none = train(cfg_for(tmp_path, corpus, *steps, "model.attn_dropout=0", name="none"))
    runs = tmp_path / "runs"
    loss = {n: [e["loss"] for e in read_events(runs / n, "training_step")] for n in ("unset", "same", "none")}
    assert loss["unset"] == loss["same"] and loss["none"] != loss["unset"]
    assert (unset["attn_dropout"], same["attn_dropout"], none["attn_dropout"]) == (0.1, 0.1, 0.0)
    assert [a["backend"] for a in none["attention"]] == ["sdpa", "sdpa"]  # summary.json: each layer's backend


def test_run_directory_written_without_the_key_resumes_bit_identical(tmp_path, corpus, monkeypatch):
    """A run directory whose config.yaml has no model.attn_dropout (written before it existed) resumes exactly."""
    common = ["train.max_steps=8", "train.checkpoint_every=4", *SPARSE]
    train(cfg_for(tmp_path, corpus, *common, name="full"))
    crash_after_step(monkeypatch, 6, lambda: train(cfg_for(tmp_path, corpus, *common, name="old")))
    old = tmp_path / "runs" / "old"
    saved = yaml.safe_load((old / "config.yaml").read_text())
    assert saved["model"].pop("attn_dropout") is None
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (old / "identity.json").unlink()  # runs from before attn_dropout had no identity record either
    resumed = train(resume=old)

    full = tmp_path / "runs" / "full"
    losses = [{e["step"]: e["loss"] for e in read_events(run, "training_step")} for run in (full, old)]
    assert losses[0] == losses[1]  # steps 5..8 were recomputed after the resume and match exactly
    wa, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(full))
    wb, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(old))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["attn_dropout"] == 0.1 and [a["backend"] for a in resumed["attention"]] == ["blocksparse"] * 2
