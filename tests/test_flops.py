"""Model FLOPs per token, GPU peaks by name, and MFU in training events."""

import pytest
import torch

from attnlab.attention.patterns import Local
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.model.gpt import GPT
from attnlab.training import flops
from attnlab.training.logs import read_events
from attnlab.training.trainer import train
from runkit import tiny_config, write_corpus


def gpt(**attn) -> GPT:
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, context=16), AttentionConfig(**attn), 50)


def test_dense_flops_per_token_is_palm_6n_plus_12lht():
    # Linear weights per layer: qkv 32x96, proj 32x32, fc 32x128, proj 128x32; plus the (tied) output layer 32x50.
    n = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 32 * 50
    assert flops.flops_per_token(gpt(), 16) == 6 * n + 12 * 2 * 16 * 32


def test_sparse_attention_is_credited_with_the_pairs_it_scores():
    dense, local = gpt(), gpt(pattern="local", window=4)
    attention = flops.flops_per_token(dense, 16) - flops.flops_per_token(local, 16)
    assert attention == pytest.approx(12 * 2 * 16 * 32 * (1 - Local(window=4).density(16, 2)))


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
        (None, None),
    ],
)
def test_peaks_by_device_name(name, peak, monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    assert flops.peak_tflops(name) == peak


def test_peak_override_and_no_peak_on_cpu(monkeypatch):
    monkeypatch.setenv(flops.PEAK_ENV, "100")
    assert flops.peak_tflops("Tesla T4") == 100.0
    assert flops.device_peak_tflops(torch.device("cpu")) is None
    assert flops.mfu(1e6, 5e7, 100.0) == pytest.approx(0.5) and flops.mfu(1e6, 5e7, None) is None


def test_training_events_carry_mfu_where_the_peak_is_known(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt")

    def cfg(name):
        return tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "train.max_steps=2", name=name)

    train(cfg("cpu"))
    assert all("mfu" not in e for e in read_events(tmp_path / "runs" / "cpu", "training_step"))
    monkeypatch.setattr(flops, "device_peak_tflops", lambda device: 0.001)  # a 1 GFLOPS "GPU"
    train(cfg("gpu"))
    run = tmp_path / "runs" / "gpu"
    per_token = flops.flops_per_token(GPT(cfg("x").model, cfg("x").attention, 256), 32)
    events = read_events(run, "training_step")
    assert len(events) == 2
    for e in events:
        assert e["mfu"] == round(per_token * e["tokens_per_second"] / 1e9, 5)
