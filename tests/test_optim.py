"""Optimizers, parameter groups and lr schedules (attnlab.training.optim)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.config import OptimConfig
from attnlab.errors import ConfigError
from attnlab.training.optim import CombinedOptimizer, build_optimizer, build_scheduler, lr_factor
from tiny_models import CTX, VOCAB, TinyGPT  # noqa: E402


def names_by_group(model, opt):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in opt.param_groups}


# ------------------------------------------------------------ parameter groups

DECAYED = {"tok_emb.weight", "pos_emb.weight"} | {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn", "mlp")}


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adagrad"])
def test_weight_decay_only_on_2d_weights_including_embeddings(name):
    model = TinyGPT()
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.05))
    groups = names_by_group(model, opt)
    assert groups["decay"] == DECAYED  # lm_head.weight is tok_emb.weight: listed once
    assert groups["no_decay"] == {n for n, p in model.named_parameters()} - DECAYED
    assert all(n.endswith("bias") or "ln_" in n or "norm_f" in n for n in groups["no_decay"])
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.05, "no_decay": 0.0}


def test_untied_lm_head_is_decayed():
    model = TinyGPT(tie=False)
    assert "lm_head.weight" in names_by_group(model, build_optimizer(model, OptimConfig()))["decay"]


def test_optimizer_hyperparameters():
    model = TinyGPT()
    cfg = OptimConfig(lr=3e-3, beta1=0.8, beta2=0.9, eps=1e-6, momentum=0.7)
    adamw = build_optimizer(model, cfg)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.8, 0.9)
    assert adamw.defaults["eps"] == 1e-6 and adamw.defaults["lr"] == 3e-3 and not adamw.defaults["fused"]
    sgd = build_optimizer(model, OptimConfig(name="sgd", momentum=0.7))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.7 and sgd.defaults["nesterov"] is False
    assert type(build_optimizer(model, OptimConfig(name="adam"))) is torch.optim.Adam
    assert type(build_optimizer(model, OptimConfig(name="adagrad"))) is torch.optim.Adagrad


def test_frozen_parameters_are_left_out():
    model = TinyGPT()
    model.pos_emb.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    assert all(p is not model.pos_emb.weight for g in opt.param_groups for p in g["params"])


# ------------------------------------------------------------ every optimizer learns

LRS = {
    "adamw": dict(lr=1e-2),
    "adam": dict(lr=1e-2),
    "sgd": dict(lr=0.3),
    "adagrad": dict(lr=0.1),
    "muon": dict(lr=1e-2, muon_lr=0.05),
}


@pytest.mark.parametrize("name", sorted(LRS))
def test_each_optimizer_decreases_the_loss(name):
    torch.manual_seed(0)
    model = TinyGPT()
    x = torch.randint(0, VOCAB, (8, CTX))
    target = torch.randn(8, CTX, VOCAB)  # a fixed regression target
    cfg = OptimConfig(name=name, schedule="constant", **LRS[name])
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=40)

    def loss_now():
        return F.mse_loss(model(x), target)

    first = loss_now().item()
    for _ in range(40):
        loss_now().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
    assert loss_now().item() < 0.9 * first


# ------------------------------------------------------------ muon


def test_muon_takes_exactly_the_2d_block_weights():
    model = TinyGPT()
    opt = build_optimizer(model, OptimConfig(name="muon", muon_lr=0.03, lr=2e-3, momentum=0.8))
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    adamw, muon = opt.optimizers
    assert type(adamw) is torch.optim.AdamW and type(muon) is torch.optim.Muon
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn", "mlp")}
    groups = names_by_group(model, opt)
    assert groups["muon"] == hidden
    assert groups["decay"] == {"tok_emb.weight", "pos_emb.weight"}
    assert groups["no_decay"] == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert [g["name"] for g in muon.param_groups] == ["muon"]
    assert muon.param_groups[0]["lr"] == 0.03 and muon.param_groups[0]["momentum"] == 0.8
    assert all(g["lr"] == 2e-3 for g in adamw.param_groups)

    # After a step, Muon holds momentum only for the hidden matrices, AdamW moments for the rest.
    model(torch.randint(0, VOCAB, (2, CTX))).square().mean().backward()
    opt.step()
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in muon.state} == hidden
    assert {by_id[id(p)] for p in adamw.state} == set(by_id.values()) - hidden
    assert len(opt.state) == len(by_id)


def test_lambda_lr_scales_muon_and_adamw_groups():
    model = TinyGPT()
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, warmup_steps=4, schedule="linear")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    base = {"decay": 1e-3, "no_decay": 1e-3, "muon": 0.02}
    assert {g["name"]: g["initial_lr"] for g in opt.param_groups} == base
    for step in range(25):
        factor = lr_factor(step, cfg, 20)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base[g["name"]] * factor, rel=1e-12)
        # the parts see the same dicts, so Muon and AdamW really use these lrs
        assert opt.optimizers[1].param_groups[0]["lr"] == opt.param_groups[-1]["lr"]
        opt.step()
        sched.step()


def test_muon_state_dict_round_trip_keeps_scheduler_working(tmp_path):
    model = TinyGPT()
    cfg = OptimConfig(name="muon", warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    model(torch.randint(0, VOCAB, (2, CTX))).square().mean().backward()
    opt.step()
    sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)

    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg, total_steps=10)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    opt2.step()
    sched2.step()  # after load, the scheduler drives the parts' new group dicts
    assert opt2.optimizers[1].param_groups[0]["lr"] == pytest.approx(cfg.muon_lr * lr_factor(2, cfg, 10))


def test_combined_optimizer_works_with_grad_scaler_and_clipping():
    model = TinyGPT()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    scaler = torch.amp.GradScaler("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.scale(model(torch.randint(0, VOCAB, (2, CTX))).square().mean()).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_muon_needs_recent_torch(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(ConfigError, match=r"optim.name=muon needs torch>=2.9"):
        build_optimizer(TinyGPT(), OptimConfig(name="muon"))


def _muon_pair(ns_dtype):
    """torch's Muon and attnlab's Float32Muon (iteration in ``ns_dtype``) on equal copies of the same matrices."""
    from attnlab.training.muon import Float32Muon

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape)) for shape in [(8, 5), (5, 8), (6, 6)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=0.02, momentum=0.9, weight_decay=0.1)
    return ps, torch.optim.Muon(ps, **kw), qs, Float32Muon(qs, ns_dtype=ns_dtype, **kw)


def _step_both(ps, a, qs, b, steps=4):
    for _ in range(steps):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()


def test_float32_muon_is_torch_muon_step_for_step_when_its_iteration_runs_in_bf16():
    ps, torch_muon, qs, ours = _muon_pair(torch.bfloat16)
    _step_both(ps, torch_muon, qs, ours)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    ours.load_state_dict(torch_muon.state_dict())  # same state layout: checkpoints move between the two
    assert all(
        torch.equal(torch_muon.state[p]["momentum_buffer"], ours.state[q]["momentum_buffer"]) for p, q in zip(ps, qs)
    )


def test_float32_muon_runs_the_iteration_in_float32():
    from attnlab.training.muon import newton_schulz

    g = torch.randn(12, 7, dtype=torch.float64)
    coefficients = torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]).defaults["ns_coefficients"]
    exact = newton_schulz(g, coefficients, 5, 1e-7, torch.float64)
    assert newton_schulz(g, coefficients, 5, 1e-7, torch.float32).dtype == torch.float32
    fp32_err = (newton_schulz(g, coefficients, 5, 1e-7, torch.float32) - exact).abs().max()
    bf16_err = (newton_schulz(g, coefficients, 5, 1e-7, torch.bfloat16) - exact).abs().max()
    assert fp32_err < 1e-5 < 1e-3 < bf16_err
    ps, torch_muon, qs, ours = _muon_pair(torch.float32)
    _step_both(ps, torch_muon, qs, ours, steps=1)
    assert all(torch.allclose(p, q, atol=1e-3) and not torch.equal(p, q) for p, q in zip(ps, qs))


def test_muon_ns_dtype_picks_the_optimizer():
    from attnlab.training.muon import Float32Muon

    assert type(build_optimizer(TinyGPT(), OptimConfig(name="muon")).optimizers[1]) is torch.optim.Muon
    muon = build_optimizer(TinyGPT(), OptimConfig(name="muon", muon_ns_dtype="float32")).optimizers[1]
    assert type(muon) is Float32Muon and muon.ns_dtype == torch.float32


# ------------------------------------------------------------ schedules


def cfg_strategy(schedules=("cosine", "linear", "wsd", "constant")):
    return st.builds(
        OptimConfig,
        schedule=st.sampled_from(schedules),
        warmup_steps=st.integers(0, 60),
        min_lr_frac=st.floats(0.0, 1.0),
        decay_frac=st.floats(0.0, 1.0),
    )


@settings(max_examples=150, deadline=None)
@given(cfg=cfg_strategy(), total=st.integers(1, 400))
def test_schedule_range_monotonicity_and_endpoints(cfg, total):
    w = cfg.warmup_steps
    f = [lr_factor(s, cfg, total) for s in range(total + 5)]
    assert f[: min(w, len(f))] == [(s + 1) / (w + 1) for s in range(min(w, len(f)))]
    assert all(a < b for a, b in zip(f[:w], f[1:w]))  # warm-up ramps up
    after = f[w:]
    if cfg.schedule == "constant":
        assert all(x == 1.0 for x in after)
        return
    assert all(cfg.min_lr_frac <= x <= 1.0 for x in after)
    assert all(b <= a for a, b in zip(after, after[1:]))  # non-increasing after warm-up
    if w < total:
        assert lr_factor(w, cfg, total) == 1.0
    if w <= total:  # (a warm-up longer than the run just ends early)
        assert lr_factor(total, cfg, total) == cfg.min_lr_frac
        assert lr_factor(total + 1000, cfg, total) == cfg.min_lr_frac


def test_schedule_shapes():
    cos = OptimConfig(schedule="cosine", min_lr_frac=0.1)
    assert lr_factor(50, cos, 100) == pytest.approx(0.55)
    assert lr_factor(25, cos, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    lin = OptimConfig(schedule="linear", min_lr_frac=0.0, warmup_steps=10)
    assert lr_factor(0, lin, 110) == pytest.approx(1 / 11)
    assert lr_factor(9, lin, 110) == pytest.approx(10 / 11)
    assert lr_factor(60, lin, 110) == pytest.approx(0.5)
    wsd = OptimConfig(schedule="wsd", min_lr_frac=0.0, decay_frac=0.2)
    assert [lr_factor(s, wsd, 100) for s in (0, 79, 80)] == [1.0, 1.0, 1.0]
    assert lr_factor(90, wsd, 100) == pytest.approx(0.5)
    const = OptimConfig(schedule="constant", warmup_steps=3)
    assert [lr_factor(s, const, 5) for s in (0, 2, 3, 10**6)] == [0.25, 0.75, 1.0, 1.0]


def test_scheduler_state_is_plain_data():
    opt = build_optimizer(TinyGPT(), OptimConfig())
    sched = build_scheduler(opt, OptimConfig(), total_steps=10)
    assert sched.state_dict()["lr_lambdas"] == [None, None]


def test_bad_total_steps():
    with pytest.raises(ValueError):
        lr_factor(0, OptimConfig(), 0)
