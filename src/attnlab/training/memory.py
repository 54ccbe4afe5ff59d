"""Will the model fit? A lower-bound memory estimate made before anything large is allocated.

The parameters are counted exactly by building the model on PyTorch's ``meta``
device (shapes only, no storage). Training needs float32 weights, gradients
and the optimizer's state per parameter, plus activations kept for backward;
evaluation needs the weights and one layer's activations. The estimate
leaves out allocator overhead and temporary buffers, so a model it refuses
certainly does not fit; one it accepts may still be tight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import Config, ModelConfig
from ..errors import ConfigError

OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4, "adagrad": 4, "muon": 4}  # per float32 parameter
ACTIVATION_FLOATS_PER_LAYER = 8  # per token and d_model kept for backward (residual, norms, q, k, v, output...)


@dataclass(frozen=True)
class Estimate:
    params: int
    state_bytes: int  # weights (+ gradients and optimizer state when training)
    activation_bytes: int

    @property
    def bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def count_params(model_cfg: ModelConfig, attn_cfg, vocab: int) -> int | None:
    """Exact parameter count from a shapes-only build; None if the model cannot be built that way."""
    from ..model.gpt import GPT  # late import: the model module is heavy

    try:
        with torch.device("meta"):
            return GPT(model_cfg, attn_cfg, vocab).num_params()
    except Exception:  # noqa: BLE001 - an estimate must never stop a model that the real build accepts
        return None


def estimate(
    cfg: Config, vocab: int, *, training: bool, batch_size: int | None = None, model_cfg: ModelConfig | None = None
) -> Estimate | None:
    """``model_cfg``: the model config as built (completed from the dataset), default ``cfg.model``."""
    m, t = model_cfg or cfg.model, cfg.train
    params = count_params(m, cfg.attention, vocab)
    if params is None:
        return None
    per_param = 4 + (4 + OPTIMIZER_STATE_BYTES.get(cfg.optim.name, 0) if training else 0)
    rows = (batch_size or t.batch_size) * m.context
    if training:
        kept = rows * (m.n_layer * ACTIVATION_FLOATS_PER_LAYER * m.d_model + 2 * vocab)  # + logits and their gradient
    else:
        kept = rows * (ACTIVATION_FLOATS_PER_LAYER * m.d_model + vocab)
    return Estimate(params, params * per_param, kept * 4)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (None when unknown)."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_fits(
    cfg: Config,
    vocab: int,
    device: torch.device,
    *,
    training: bool,
    batch_size: int | None = None,
    model_cfg: ModelConfig | None = None,
) -> None:
    """ConfigError with the estimate when the model cannot fit in `device`'s free memory."""
    free = available_bytes(torch.device(device))
    if free is None:
        return
    est = estimate(cfg, vocab, training=training, batch_size=batch_size, model_cfg=model_cfg)
    if est is None or est.bytes <= free:
        return
    m = model_cfg or cfg.model
    state = "weights, gradients and optimizer state" if training else "weights"
    raise ConfigError(
        f"the model does not fit in memory: {est.params / 1e9:,.2f} billion parameters need at least "
        f"{_gb(est.bytes)} to {'train' if training else 'evaluate'} ({state} {_gb(est.state_bytes)}, "
        f"activations {_gb(est.activation_bytes)}) but only {_gb(free)} is available on {device}: "
        f"use a smaller model (model.d_model={m.d_model}, model.n_layer={m.n_layer}, "
        f"model.context={m.context}) or a smaller batch"
    )
