"""Optimizers (AdamW, Adam, SGD, Adagrad, Muon) and learning-rate schedules.

Parameter groups follow nanoGPT: every parameter with 2 or more dimensions
(Linear weights *and* the token/position embedding tables) is decayed; 1-D
parameters (biases, norm gains) are not. Embeddings are decayed because
nanoGPT does so and it keeps them on the same footing as the tied output
layer (``lm_head.weight`` is ``tok_emb.weight`` when weights are tied).

How ``optim.weight_decay`` acts per optimizer:

- ``adamw``: decoupled decay (Loshchilov & Hutter).
- ``adam``, ``sgd``, ``adagrad``: classic L2 (added to the gradient) on the
  decay group, which is what these optimizers' ``weight_decay`` means; set
  ``optim.weight_decay=0`` for plain Adam.
- ``muon``: ``torch.optim.Muon`` (decoupled decay, Nesterov momentum) at
  ``optim.muon_lr`` for the 2-D weights under ``blocks.``; everything else
  (embeddings, output layer, biases, norms) uses AdamW at ``optim.lr``.
  ``optim.muon_ns_dtype=float32`` runs its Newton–Schulz step in float32
  (``muon.Float32Muon``) instead of torch's bfloat16.

Every param group carries a ``name`` ("decay", "no_decay" or "muon") so logs
and tests can tell them apart.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import OptimConfig
from ..errors import CheckpointError, ConfigError

__all__ = ["CombinedOptimizer", "Continuation", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


# ------------------------------------------------------------ param groups


def param_groups(model: nn.Module, cfg: OptimConfig, muon: bool = False) -> list[dict]:
    """nanoGPT-style groups; with ``muon`` a third group holds the 2-D weights under ``blocks.``.

    ``named_parameters`` de-duplicates tied weights, so a tied lm_head/tok_emb
    appears once. Frozen parameters are left out.
    """
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if muon and p.ndim == 2 and name.startswith("blocks."):
            hidden.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if muon:
        groups.append({"params": hidden, "weight_decay": cfg.weight_decay, "name": "muon"})
    return groups


def _nonempty(groups: list[dict]) -> list[dict]:
    return [g for g in groups if g["params"]]


def _on_cuda(groups: list[dict]) -> bool:
    return all(p.is_cuda for g in groups for p in g["params"])


def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    # The fused kernel is the fastest on CUDA; elsewhere torch picks foreach/for-loop itself.
    fused = {"fused": True} if _on_cuda(groups) else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over ``model``'s trainable parameters."""
    if cfg.name == "muon":
        return _build_muon(model, cfg)
    groups = _nonempty(param_groups(model, cfg))
    if not groups:
        raise ConfigError("the model has no trainable parameters: nothing to optimize")
    if cfg.name == "adamw":
        return _adamw(groups, cfg)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps)
    raise ConfigError(f"optim.name={cfg.name!r} is not allowed: use one of adamw, adam, sgd, adagrad, muon")


def _build_muon(model: nn.Module, cfg: OptimConfig) -> CombinedOptimizer:
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise ConfigError(
            f"optim.name=muon needs torch>=2.9 (installed {torch.__version__}): upgrade torch or use optim.name=adamw"
        )
    decay, no_decay, hidden = param_groups(model, cfg, muon=True)
    if not hidden["params"]:
        raise ConfigError("optim.name=muon found no 2-D weights under blocks.: use optim.name=adamw for this model")
    muon = dict(lr=cfg.muon_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.muon_ns_dtype == "float32":
        from .muon import Float32Muon  # needs torch.optim.Muon, checked above

        parts = [Float32Muon([hidden], ns_dtype=torch.float32, **muon)]
    else:
        parts = [muon_cls([hidden], **muon)]
    rest = _nonempty([decay, no_decay])
    if rest:
        parts.insert(0, _adamw(rest, cfg))
    return CombinedOptimizer(parts)


# ------------------------------------------------------------ combined optimizer


class CombinedOptimizer(torch.optim.Optimizer):
    """Several torch optimizers stepped as one (Muon for hidden matrices + AdamW for the rest).

    It subclasses ``torch.optim.Optimizer`` so that ``LambdaLR`` and
    ``GradScaler`` accept it, but keeps no groups or state of its own:
    ``param_groups`` is the live concatenation of the parts' groups (each with
    its own ``lr``/``initial_lr``, so one scheduler scales all of them), and
    ``state_dict`` is ``{"optimizers": [part.state_dict(), ...]}``.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        # Optimizer.__init__ would create its own param_groups/state; we only set up
        # what the base class' hook machinery needs and delegate the rest.
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        self.defaults = {}
        for hooks in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict]:
        # Rebuilt on each access: a part's load_state_dict replaces its group dicts.
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise CheckpointError(
                f"the saved optimizer state does not match {self!r}: resume with the optim "
                "settings the run was trained with (its config.yaml)"
            )
        for opt, sd in zip(self.optimizers, parts):
            opt.load_state_dict(sd)

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("add the group to one of CombinedOptimizer.optimizers")

    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return "CombinedOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"


# ------------------------------------------------------------ schedules


@dataclass(frozen=True)
class RunClock:
    """How far a run has come, as a fraction in [0, 1]: of its planned steps, of its time budget (training
    seconds only), or, with both, whichever is further along, so the schedule ends annealed whichever
    stops the run first. ``seconds`` reads the run's training seconds so far."""

    total_steps: int | None
    budget_s: float | None
    seconds: Callable[[], float]

    @property
    def follows(self) -> str:
        if self.budget_s is None:
            return "steps"
        return "time_budget" if self.total_steps is None else "steps_or_time_budget"

    def fraction(self, step: int) -> float:
        by_steps = step / self.total_steps if self.total_steps else 0.0
        by_time = self.seconds() / self.budget_s if self.budget_s else 0.0
        return min(1.0, max(by_steps, by_time))


@dataclass(frozen=True)
class Continuation:
    """A run extended at ``step`` (its new stopping rule in ``lr_factor``'s ``total_steps``/``done``): a cosine or
    linear schedule goes on from ``factor``, the lr factor it had reached there, down to ``min_lr_frac`` at the new
    end, over the steps (or, with a time budget, the fraction of the run) still to come. ``start`` is the run's
    fraction done at ``step`` under the new stopping rule (the clock's ``fraction``)."""

    step: int
    factor: float
    start: float


def lr_factor(
    step: int, cfg: OptimConfig, total_steps: int, done: float | None = None, after: Continuation | None = None
) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``,
    so the first step already moves and the ramp reaches 1 at ``warmup_steps``.
    After it, from exactly 1 at ``warmup_steps`` to exactly ``min_lr_frac`` at
    ``total_steps`` (kept beyond): ``cosine``, ``linear``, or ``wsd`` (1 until
    the last ``decay_frac`` of all ``total_steps``, then linear); ``constant``
    stays 1. A warm-up longer than the run simply ends with the run; with a time budget the ramp is capped
    by the decay the fraction ``done`` gives, so a budget that ends during warm-up still ends at ``min_lr_frac``.

    ``after`` (an extended run, ``Continuation``): from its step on, ``cosine`` and ``linear`` go from
    ``after.factor`` to ``min_lr_frac`` at the new end, ``progress = (step - after.step) / (total_steps -
    after.step)`` (with a time budget, ``(done - after.start) / (1 - after.start)``); ``wsd`` simply follows
    the new total (stable until its last ``decay_frac``); ``constant`` stays 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = cfg.warmup_steps
    if step < warmup:
        ramp = (step + 1) / (warmup + 1)
        # A budget that runs out during warm-up still ends annealed: the decay by the fraction done caps the ramp.
        return ramp if done is None or cfg.schedule == "constant" else min(ramp, _by_fraction(done, cfg, 0.0))
    if cfg.schedule == "constant":
        return 1.0
    if after is not None and cfg.schedule in ("cosine", "linear") and step >= after.step:
        return _continued(step, cfg, total_steps, done, after)
    if done is not None:
        return _by_fraction(done, cfg, warmup / total_steps if total_steps < UNPLANNED else 0.0)
    if step >= total_steps:
        return cfg.min_lr_frac
    if cfg.schedule == "wsd":
        start = max(warmup, total_steps * (1.0 - cfg.decay_frac))
        if step < start:
            return 1.0
        progress = (step - start) / (total_steps - start)
        return _towards_min(progress, cfg.min_lr_frac)
    progress = (step - warmup) / (total_steps - warmup)
    if cfg.schedule == "linear":
        return _towards_min(progress, cfg.min_lr_frac)
    if cfg.schedule == "cosine":
        return _towards_min(0.5 * (1.0 - math.cos(math.pi * progress)), cfg.min_lr_frac)
    raise ConfigError(f"optim.schedule={cfg.schedule!r} is not allowed: use one of cosine, linear, wsd, constant")


# total_steps at or above this means "no planned number of steps" (a run stopped by its time budget alone).
UNPLANNED = 10**12


def _by_fraction(done: float, cfg: OptimConfig, start: float) -> float:
    """The decay after warm-up driven by the run's fraction ``done`` (``RunClock``): 1 at ``start`` (where
    warm-up ends), ``min_lr_frac`` at 1; ``wsd`` decays over the last ``decay_frac`` of the run."""
    if done >= 1.0:
        return cfg.min_lr_frac
    if cfg.schedule == "wsd":
        start = max(start, 1.0 - cfg.decay_frac)
        if done < start:
            return 1.0
    progress = min(1.0, max(0.0, (done - start) / (1.0 - start))) if start < 1.0 else 1.0
    if cfg.schedule == "cosine":
        return _towards_min(0.5 * (1.0 - math.cos(math.pi * progress)), cfg.min_lr_frac)
    return _towards_min(progress, cfg.min_lr_frac)


def _continued(step: int, cfg: OptimConfig, total_steps: int, done: float | None, after: Continuation) -> float:
    """``after.factor`` at ``after.step``, ``min_lr_frac`` at the (new) end; cosine or linear in between."""
    if done is not None:
        progress = 1.0 if done >= 1.0 or after.start >= 1.0 else max(0.0, (done - after.start) / (1.0 - after.start))
    else:
        progress = 1.0 if step >= total_steps else (step - after.step) / (total_steps - after.step)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return min(after.factor, max(cfg.min_lr_frac, cfg.min_lr_frac + (after.factor - cfg.min_lr_frac) * shape))


def _towards_min(decayed: float, min_frac: float) -> float:
    """1 at decayed=0, min_frac at decayed=1; clamped so float rounding never leaves [min_frac, 1]."""
    return min(1.0, max(min_frac, 1.0 - (1.0 - min_frac) * decayed))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    total_steps: int,
    clock: RunClock | None = None,
    after: Continuation | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying ``lr_factor``; call ``scheduler.step()`` after each ``optimizer.step()`` (and, with a
    budget ``clock``, after the step's seconds are counted, so the lr follows the budget used).

    The lambda is a plain function, so the scheduler's state_dict holds only
    numbers (it loads with ``torch.load(weights_only=True)``).
    """
    lr_factor(0, cfg, total_steps)  # validate before touching the optimizer's lrs
    by_budget = clock is not None and clock.budget_s is not None

    def factor(step: int) -> float:
        return lr_factor(step, cfg, total_steps, clock.fraction(step) if by_budget else None, after)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
