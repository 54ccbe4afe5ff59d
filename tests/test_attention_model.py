"""Patterns inside the model and the trainer: causal end to end, the configured backend really runs, logged per layer."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab import config
from attnlab.attention import blocksparse as blocksparse_mod
from attnlab.model.gpt import GPT
from attnlab.training.trainer import train
from runkit import tiny_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {
    "dense": [],
    "local": ["attention.pattern=local", "attention.window=5"],
    "strided_split": ["attention.pattern=strided", "attention.local_attn_ctx=4"],
    "strided_union": ["attention.pattern=strided", "attention.local_attn_ctx=8", "attention.strided_mode=union"],
    "strided_interleave": [
        "attention.pattern=strided",
        "attention.local_attn_ctx=4",
        "attention.strided_mode=interleave",
    ],
    "fixed": [
        "attention.pattern=fixed",
        "attention.local_attn_ctx=8",
        "attention.blocksize=4",
        "attention.num_verts=2",
    ],
    "sink_window": ["attention.pattern=sink_window", "attention.sinks=2", "attention.window=4"],
    "linear": ["attention.pattern=linear"],
    "schedule": ["attention.schedule=local,local,local,strided", "attention.window=3", "attention.local_attn_ctx=4"],
}


def model_for(overrides, position="rope"):
    cfg = config.load(
        None,
        [
            "model.n_layer=4",
            "model.n_head=4",
            "model.d_model=32",
            "model.context=32",
            f"model.position={position}",
            "train.max_steps=1",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return GPT(cfg.model, cfg.attention, vocab_size=50).eval()


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_whole_model_is_causal_and_backends_agree(name, backend):
    model = model_for(SETTINGS[name] + [f"attention.backend={backend}"])
    idx = torch.randint(0, 50, (2, 32), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % 50
    with torch.no_grad():
        a, b = model(idx), model(changed)
        assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6) and not torch.allclose(a[:, 20:], b[:, 20:])
        for block in model.blocks:
            block.attn.core.requested = "reference"
            block.attn.core.resolve("cpu")
        torch.testing.assert_close(model(idx), a, atol=1e-4, rtol=1e-4)


def test_a_training_step_runs_the_configured_pattern_and_backend(tmp_path, monkeypatch):
    """Spy on the kernels: the local/strided layers go through blocksparse with their own patterns, never dense SDPA."""
    seen = []
    real = blocksparse_mod.blocksparse
    monkeypatch.setattr(blocksparse_mod, "blocksparse", lambda q, k, v, p, *a: seen.append(p) or real(q, k, v, p, *a))

    def no_dense(*a, **kw):
        raise AssertionError("dense SDPA ran in a sparse model")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_dense)
    corpus = write_corpus(tmp_path / "c.txt")
    cfg = tiny_config(
        corpus,
        tmp_path / "data",
        tmp_path / "runs",
        "model.n_layer=4",
        "attention.schedule=local,local,local,strided",
        "attention.window=6",
        "attention.local_attn_ctx=8",
        "attention.strided_mode=union",
        "train.max_steps=2",
    )
    summary = train(cfg)
    layers = summary["attention"]
    assert [(x["pattern"], x["backend"]) for x in layers] == [("local", "blocksparse")] * 3 + [
        ("strided", "blocksparse")
    ]
    assert layers[0]["params"] == {"window": 6} and layers[3]["params"]["strided_mode"] == "union"
    assert 0 < layers[0]["density"] < layers[3]["density"] < 1
    assert {p.name for p in seen} == {"local", "strided"}
    run = tmp_path / "runs" / "t"
    info = next(
        e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == "model_info"
    )
    assert info["attention"] == layers


def test_forced_backend_that_cannot_run_fails_before_training(tmp_path):
    from attnlab.errors import ConfigError

    with pytest.raises(ConfigError, match="backend='sdpa' cannot run pattern 'local'"):
        config.load(None, ["attention.pattern=local", "attention.backend=sdpa", "train.max_steps=1"])
