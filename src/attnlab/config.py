"""Typed, validated run configuration.

A config is a tree of dataclasses. It is loaded from a YAML preset, then
overridden by dotted ``key=value`` arguments (``model.n_layer=8``). Every
field declares its allowed values (``choices``) or range (``lo``/``hi``) in
its metadata, so unknown keys and bad values are rejected with the closest
valid key and the allowed range.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .attention.backends import attention_dropout, select_backend
from .attention.modifiers import check_modifiers, modifier_specs
from .attention.patterns import PATTERNS, Pattern, build_pattern, get_pattern, load_plugin, param_owners
from .errors import ConfigError


def opt(default, *, choices=None, lo=None, hi=None, help=""):
    """A config field with its allowed values or range."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = opt(
        "python-stdlib",
        help="named source (python-stdlib, hn-titles, shakespeare, arxiv-abstracts; "
        "images: cifar10, digits, image-folder, imagenet-downsampled; arithmetic: "
        "addition, subtraction, multiplication), hf:NAME (a Hugging Face dataset "
        "or a local save_to_disk/parquet path) or a local file",
    )
    path: str | None = opt(None, help="local copy of a named download source")
    format: str = opt("auto", choices=["auto", "text", "lines", "jsonl", "csv", "tsv", "parquet", "arxiv"])
    field: str | None = opt(None, help="JSONL field / CSV column / parquet column holding the text")
    categories: list[str] = opt([], help="arXiv category filter (prefix match, e.g. cs.LG)")
    max_docs: int | None = opt(None, lo=1, help="keep at most this many documents (after the seeded shuffle)")
    max_bytes: int | None = opt(
        None, lo=1, help="keep documents until this many UTF-8 bytes (after the seeded shuffle)"
    )
    tokenizer: str = opt("bpe", choices=["bpe", "bytes", "char"])
    vocab_size: int = opt(4096, lo=260, hi=1 << 20, help="BPE vocabulary size (ignored for bytes/char)")
    tokenizer_fit: str = opt(
        "train",
        choices=["train", "train+val"],
        help="documents the bpe/char tokenizer is fit on; train+val lets it see the validation text, "
        "as the Maincode mainrun challenge does (recorded and labelled in eval output)",
    )
    val_frac: float = opt(0.1, lo=0.0, hi=0.5)
    seed: int = opt(1337, lo=0)
    dir: str | None = opt(None, help="prepared dataset folder; prepared here on first use (default data/<source-name>)")
    image_size: int | None = opt(
        None, choices=[8, 16, 32, 64], help="images: resize/downsample to S x S (default: the source's size)"
    )
    classes: list[str] = opt([], help="images: keep only these classes (names or label numbers)")
    max_test: int | None = opt(None, lo=1, help="images: keep only the first N test images (a faster, labelled subset)")
    split: str | None = opt(None, help="hf: sources: the split to read (default train)")
    config: str | None = opt(None, help="hf: sources: the dataset configuration (subset) name")
    tokenizer_file: str | None = opt(
        None,
        help="an existing Hugging Face tokenizer.json used instead of training one "
        "(data.tokenizer=bpe; the vocabulary size comes from the file)",
    )
    task: str | None = opt(
        None,
        choices=["addition", "subtraction", "multiplication"],
        help="arithmetic sources: the operation (default: the source's name)",
    )
    digits: int = opt(3, lo=1, hi=30, help="arithmetic: training operands have 1..digits digits")
    eval_digits: list[int] = opt([], help="arithmetic: operand lengths of the held-out problems (default 1..digits+2)")
    eval_problems: int = opt(100, lo=1, hi=100000, help="arithmetic: held-out problems per operand length")
    reverse_answer: bool = opt(False, help="arithmetic: write the answer's digits least significant first")


@dataclass
class ModelConfig:
    n_layer: int = opt(4, lo=1, hi=256)
    n_head: int = opt(4, lo=1, hi=256)
    n_kv_head: int | None = opt(
        None,
        lo=1,
        hi=256,
        help="key/value heads shared by groups of query heads "
        "(grouped-query attention; 1 = multi-query); must divide "
        "n_head (default n_head)",
    )
    d_model: int = opt(128, lo=8, hi=65536)
    context: int = opt(256, lo=2, hi=1 << 20, help="training context length in tokens")
    dropout: float = opt(0.0, lo=0.0, hi=0.9)
    attn_dropout: float | None = opt(
        None,
        lo=0.0,
        hi=0.9,
        help="dropout on the attention weights; None (the default): "
        "model.dropout, which applies to the residual outputs and embeddings. 0 lets GPUs run "
        "sparse patterns through FlexAttention, which has no attention dropout",
    )
    position: str = opt(
        "learned",
        choices=["learned", "sinusoidal", "rope", "none", "alibi", "image", "image+learned"],
        help="image: the Sparse Transformer's row/column/channel embeddings (image+learned: both added); "
        "alibi: no position embedding, the alibi score modifier in every layer",
    )
    image_shape: list[int] = opt(
        [], help="image positions: [height, width, channels] of one image (default: the dataset's)"
    )
    norm: str = opt("layernorm", choices=["layernorm", "rmsnorm"])
    norm_position: str = opt("pre", choices=["pre", "post"])
    mlp: str = opt("gelu", choices=["gelu", "relu", "swiglu"])
    mlp_hidden: int | None = opt(
        None, lo=1, help="MLP hidden size (default 4*d_model, 8/3*d_model for swiglu); excludes mlp_ratio"
    )
    mlp_ratio: float | None = opt(
        None,
        lo=0.01,
        hi=64.0,
        help="MLP hidden size as round(mlp_ratio * d_model), e.g. 2 for the "
        "Sparse Transformer's half-size feed-forward; excludes mlp_hidden",
    )
    qk_ratio: float = opt(
        1.0,
        lo=0.01,
        hi=16.0,
        help="query/key projection width as a fraction of d_model (0.5: the Sparse "
        "Transformer's half-size query-key); values and output keep d_model",
    )
    qk_norm: bool = opt(False)
    bias: bool = opt(True)
    tie_weights: bool = opt(True)
    init: str = opt(
        "gpt2",
        choices=["gpt2", "xavier", "sparse_transformer", "mainrun"],
        help="sparse_transformer: Child et al. 2019 (weights N(0, 0.125/sqrt(fan_in)), residual outputs "
        "also / sqrt(2*n_layer), embeddings N(0, 0.125/sqrt(d_model)); the output layer starts at zero, untied); "
        "mainrun: the mainrun challenge's train.py (every weight N(0, init_std), residual outputs unscaled, "
        "learned positions start at zero)",
    )
    init_std: float = opt(
        0.02,
        lo=1e-6,
        hi=1.0,
        help="gpt2: std of every weight (residual outputs / sqrt(2*n_layer)); xavier: std of the embeddings",
    )
    zero_init_logits: bool = opt(
        False, help="start the output layer at zero (uniform first prediction); unties weights"
    )
    checkpoint_activations: bool = opt(
        False, help="recompute each block in backward (less activation memory, about one more forward of compute)"
    )
    position_reset: str = opt(
        "none",
        choices=["none", "document"],
        help="document: positions restart at 0 after every <eos> (learned, sinusoidal and rope positions)",
    )
    eos_id: int | None = opt(
        None, lo=0, help="the document separator's token id (default: the dataset's <eos>; read by document masking)"
    )

    def check(self) -> None:
        """The rules that tie model fields together; ConfigError naming the keys to change."""
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}: choose d_model as a multiple of n_head"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}: "
                f"choose a divisor of {self.n_head} (1 = multi-query attention) or leave n_kv_head unset"
            )
        head = self.d_model // self.n_head
        qk = self.qk_ratio * head
        if abs(qk - round(qk)) > 1e-6 or round(qk) < 1:
            raise ConfigError(
                f"model.qk_ratio={self.qk_ratio} gives a query/key head size of {qk:g} (qk_ratio * d_model/n_head "
                f"= {self.qk_ratio} * {head}): choose a ratio that makes it a whole number >= 1"
            )
        if self.position == "rope" and round(qk) % 2:
            raise ConfigError(
                f"model.position=rope needs an even head size for queries and keys, got qk_ratio * d_model/n_head "
                f"= {round(qk)}: change d_model, n_head or qk_ratio"
            )
        if self.mlp_hidden is not None and self.mlp_ratio is not None:
            raise ConfigError(
                f"model.mlp_hidden={self.mlp_hidden} and model.mlp_ratio={self.mlp_ratio} are both set: keep one of them"
            )
        if self.mlp_ratio is not None and round(self.mlp_ratio * self.d_model) < 1:
            raise ConfigError(
                f"model.mlp_ratio={self.mlp_ratio} gives an MLP hidden size of 0 with d_model={self.d_model}: use a larger ratio"
            )
        if self.position_reset != "none" and self.position not in ("learned", "sinusoidal", "rope"):
            has = "has none" if self.position in ("none", "alibi") else "gives image coordinates, not token positions"
            raise ConfigError(
                f"model.position_reset={self.position_reset} needs positions to reset, but model.position="
                f"{self.position} {has}: use model.position=learned, sinusoidal or rope, or model.position_reset=none"
            )


@dataclass(init=False)
class AttentionConfig:
    """Which attention each layer uses.

    Pattern parameters (``window``, ``local_attn_ctx``, ... and those of plugins; ``attnlab patterns``
    lists them) are set flat, ``attention.window=64``, for the patterns that ``pattern`` or ``schedule``
    name, or per layer in ``layers``. They live in ``params`` and are written flat in config.yaml.
    """

    pattern: str = opt("dense", help="the pattern of every layer (attnlab patterns lists them with their parameters)")
    schedule: list[str] = opt(
        [], help="per-layer pattern names, repeated over the layers (e.g. local,local,local,strided); overrides pattern"
    )
    layers: list[dict] = opt(
        [],
        help="per-layer specs, repeated over the layers, each with its own parameters, e.g. "
        "[{pattern: local, window: 64}, {pattern: dense}]; overrides pattern and schedule",
    )
    backend: str = opt("auto", choices=["auto", "reference", "sdpa", "blocksparse", "flex", "linear"])
    plugins: list[str] = opt(
        [],
        help="Python files (or importable modules) that register more patterns or modifiers; "
        "each file is copied into the run directory",
    )
    modifiers: list[str] = opt(
        [],
        help="score modifiers applied in order before the mask, e.g. alibi, "
        "softcap(cap=30), relpos(buckets=32,max_distance=128); a layers entry may "
        "set its own",
    )
    document_mask: bool = opt(
        False,
        help="a query sees only keys of its own document (the tokens after the last <eos> before it, up to "
        "and including the <eos> that ends it), intersected with every layer's pattern",
    )
    params: dict = field(default_factory=dict, metadata={"flat": True})

    def __init__(
        self,
        pattern: str = "dense",
        schedule: list[str] | None = None,
        layers: list[dict] | None = None,
        backend: str = "auto",
        plugins: list[str] | None = None,
        modifiers: list[str] | None = None,
        document_mask: bool = False,
        params: dict | None = None,
        **flat: Any,
    ):
        self.pattern, self.backend, self.document_mask = pattern, backend, document_mask
        self.schedule, self.layers, self.plugins = (
            list(schedule or []),
            [dict(x) for x in layers or []],
            list(plugins or []),
        )
        self.modifiers = list(modifiers or [])
        self.params = {**(params or {}), **flat}

    def __getattr__(self, name: str) -> Any:
        """``attention.window`` and the like: a flat pattern parameter, set or (for the named patterns) default."""
        if name.startswith("_") or name == "params":
            raise AttributeError(name)
        params = self.resolved_params()
        if name in params:
            return params[name]
        if name in param_owners():  # a parameter of a pattern this config does not use: unset
            return None
        raise AttributeError(f"AttentionConfig has no field or pattern parameter {name!r}")

    def layer_spec(self, layer_idx: int) -> tuple[dict, str]:
        """Layer ``layer_idx``'s spec ``{"pattern": name, **params}`` and the config key that names it (for errors)."""
        if self.layers:
            i = layer_idx % len(self.layers)
            return {k: v for k, v in self.layers[i].items() if k != "modifiers"}, f"attention.layers[{i}]"
        name = self.schedule[layer_idx % len(self.schedule)] if self.schedule else self.pattern
        cls = get_pattern(name, "attention.schedule" if self.schedule else "attention.pattern")
        return {"pattern": name, **{k: v for k, v in self.params.items() if k in cls.parameters()}}, "attention"

    def layer_modifiers(self, layer_idx: int) -> list[str]:
        """The score modifiers of layer ``layer_idx``: its ``layers`` entry's own, else ``modifiers``."""
        if self.layers and "modifiers" in self.layers[layer_idx % len(self.layers)]:
            return list(self.layers[layer_idx % len(self.layers)]["modifiers"])
        return list(self.modifiers)

    def resolved_params(self) -> dict:
        """The flat parameters with the defaults of the patterns ``pattern``/``schedule`` name filled in."""
        out = dict(self.params)
        for name in dict.fromkeys(self.schedule or [self.pattern]):
            cls = PATTERNS.get(name)
            for pname, f in (cls.parameters() if cls else {}).items():
                out.setdefault(pname, f.default)
        return out


@dataclass
class OptimConfig:
    name: str = opt("adamw", choices=["adamw", "adam", "sgd", "adagrad", "muon"])
    lr: float = opt(1e-3, lo=0.0, hi=10.0)
    min_lr_frac: float = opt(0.1, lo=0.0, hi=1.0, help="final lr as a fraction of lr (cosine, linear, wsd)")
    weight_decay: float = opt(0.1, lo=0.0, hi=10.0)
    beta1: float = opt(0.9, lo=0.0, hi=1.0)
    beta2: float = opt(0.95, lo=0.0, hi=1.0)
    eps: float = opt(1e-8, lo=0.0, hi=1.0)
    momentum: float = opt(0.9, lo=0.0, hi=1.0, help="SGD / Muon momentum")
    muon_lr: float = opt(0.02, lo=0.0, hi=10.0, help="Muon lr for 2-D hidden weights (the rest use lr with AdamW)")
    muon_ns_dtype: str = opt(
        "bfloat16",
        choices=["bfloat16", "float32"],
        help="dtype of Muon's Newton-Schulz step (bfloat16: torch.optim.Muon's; float32: far faster on CPUs "
        "without bf16 matrix units)",
    )
    grad_clip: float = opt(1.0, lo=0.0, help="max global grad norm; 0 disables")
    schedule: str = opt("cosine", choices=["cosine", "linear", "wsd", "constant"])
    warmup_steps: int = opt(0, lo=0)
    decay_frac: float = opt(0.2, lo=0.0, hi=1.0, help="wsd: fraction of steps spent decaying")


@dataclass
class TrainConfig:
    batch_size: int = opt(32, lo=1)
    batch_order: str = opt(
        "shuffled",
        choices=["shuffled", "sequential"],
        help="shuffled: windows from a random offset in a random order, new each epoch; sequential: the mainrun "
        "challenge's walk, consecutive windows from token 0, the same order every epoch",
    )
    grad_accum: int = opt(1, lo=1)
    epochs: float | None = opt(None, lo=0.0, help="stop after this many passes over train.bin")
    max_steps: int | None = opt(None, lo=1, help="stop after this many optimizer steps")
    time_budget_s: float | None = opt(None, lo=0.0, help="stop after this much training wall-clock")
    eval_every: int | None = opt(None, lo=1, help="evaluate every N steps")
    evals_per_epoch: int | None = opt(None, lo=1)
    val_tokens: int | None = opt(
        None,
        lo=1,
        help="tokens scored by periodic evals (None = whole split); the final eval always scores the whole split",
    )
    eval_batch_size: int = opt(32, lo=1)
    eval_stride: int | None = opt(None, lo=1, help="sliding-window stride for evaluation (default context)")
    early_stopping_patience: int | None = opt(None, lo=1, help="stop after N evals without val improvement")
    checkpoint_every: int | None = opt(None, lo=1, help="save a checkpoint every N steps (always at the end)")
    seed: int = opt(1337, lo=0)
    device: str = opt("auto", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = opt(
        "auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast dtype (auto: bf16 on supporting GPUs, fp32 on CPU)",
    )
    compile: bool = opt(False)
    threads: int | None = opt(None, lo=1, help="CPU threads (default: torch's choice)")
    parallel: str = opt(
        "ddp", choices=["ddp", "fsdp"], help="under torchrun: DDP replicas or FSDP2 sharding (ignored in one process)"
    )
    init_from: str | None = opt(
        None, help="start from the weights of RUN or RUN/checkpoints/step_N (fresh optimizer and schedule)"
    )


@dataclass
class LoggingConfig:
    log_every: int = opt(10, lo=1)
    progress: bool = opt(True)
    wandb: str = opt("off", choices=["off", "online", "offline"])
    wandb_project: str = opt("attnlab")
    tensorboard: bool = opt(False)
    sample_tokens: int = opt(0, lo=0, help="text: tokens to sample into samples/ at each evaluation (0 = none)")
    sample_images: int = opt(
        0, lo=0, hi=256, help="images: a grid of this many samples into samples/ at each evaluation (0 = none)"
    )
    attention_stats: int = opt(
        4,
        lo=0,
        hi=64,
        help="per-head attention statistics over this many validation sequences "
        "at each evaluation (attention_stats events; 0 = off)",
    )


@dataclass
class Config:
    name: str = opt("run", help="run name; the run directory is out_dir/name")
    out_dir: str = opt("runs")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> Config:
        validate(self)
        m = self.model
        m.check()
        if m.image_shape and (len(m.image_shape) != 3 or min(m.image_shape) < 1):
            raise ConfigError(
                f"model.image_shape={m.image_shape} is not [height, width, channels]: set e.g. model.image_shape=32,32,3 "
                "(or leave it empty to take the dataset's)"
            )
        t = self.train
        if t.epochs is not None and t.epochs <= 0:
            raise ConfigError(
                f"train.epochs={t.epochs} trains no step: use train.epochs > 0 (e.g. 0.5 for half a pass)"
            )
        if t.epochs is None and t.max_steps is None and t.time_budget_s is None:
            raise ConfigError("no stopping rule: set train.epochs, train.max_steps or train.time_budget_s")
        if t.eval_stride is not None and t.eval_stride > m.context:
            raise ConfigError(
                f"train.eval_stride={t.eval_stride} exceeds model.context={m.context}: use a stride in [1, {m.context}]"
            )
        if self.optim.beta2 >= 1.0 or self.optim.beta1 >= 1.0:
            raise ConfigError("optim.beta1 and optim.beta2 must be < 1: use e.g. beta1=0.9 beta2=0.95")
        check_attention(self.attention, m)
        if self.name in ("", ".", "..") or "/" in self.name or not self.name.isprintable():  # control characters too
            raise ConfigError(f"name={self.name!r} is not a valid run name: use letters, digits, '-' or '_'")
        return self


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def check_attention(a: AttentionConfig, m: ModelConfig) -> None:
    """Build every layer's pattern (raising on bad parameters) and check it at the context and for the backend;
    errors name the layer's key."""
    for i in range(m.n_layer):
        pattern = build_pattern(a, i, m.n_layer, m.n_head, m.context)
        where = a.layer_spec(i)[1]
        specs = modifier_specs(a, m, i)
        try:
            pattern.check(m.context)
            check_modifiers(specs, pattern, m.n_head, i)
            select_backend(a.backend, pattern, None, attention_dropout(m), specs, a.document_mask)
        except ConfigError as e:
            raise ConfigError(str(e) if where == "attention" else f"{where}: {e}") from None


# ---------------------------------------------------------------- validation

SHOW_LIMIT = 200  # characters of a value quoted in a message
MAX_VALUE_ITEMS = 100_000  # items a value may expand to through YAML aliases
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = SHOW_LIMIT
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


def show(value: Any) -> str:
    """repr() of a value for a one-line message, at most about SHOW_LIMIT characters, however large the value."""
    text = _repr.repr(value)
    return text if len(text) <= SHOW_LIMIT else text[:SHOW_LIMIT] + "..."


def _count_items(value: Any, limit: int) -> int:
    """Items in a nested list/dict value as written out (aliases expanded), counting stops past `limit`.

    A YAML alias reuses one Python object, so a few lines can stand for billions of
    items; counts are memoised per object and never expand anything."""
    memo: dict[int, int] = {}

    def count(v) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        if id(v) not in memo:
            memo[id(v)] = 0  # a recursive alias counts as nothing more
            total = 1
            for item in v.values() if isinstance(v, dict) else v:
                total += count(item)
                if total > limit:
                    break
            memo[id(v)] = total
        return memo[id(v)]

    return count(value)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None:
        return f"a value in [{lo}, {hi}]"
    if lo is not None:
        return f"a value >= {lo}"
    if hi is not None:
        return f"a value <= {hi}"
    return "a valid value"


def _check_value(key: str, f: dataclasses.Field, value: Any) -> None:
    if value is None:
        return
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{key}={show(value)} is not allowed: use {_allowed(f)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (
            not math.isfinite(value)
            or (m.get("lo") is not None and value < m["lo"])
            or (m.get("hi") is not None and value > m["hi"])
        ):
            raise ConfigError(f"{key}={show(value)} is out of range: use {_allowed(f)}")


def validate(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                _check_value(f"{section.name}.{f.name}", f, getattr(obj, f.name))
        else:
            _check_value(section.name, section, obj)


# ------------------------------------------------------------ type coercion


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(key, args[0], value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in _split_list(value) if v] if value not in ("", "[]") else []
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list, got {show(value)}: write {key}=a,b,c")
        return [_coerce(key, inner, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key} expects true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects an integer, got {show(value)}")
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} expects an integer, got {show(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects a number, got {show(value)}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects a number, got {show(value)}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} expects a string, got {show(value)}")
        if "\x00" in str(value):  # no path or name may hold one (the OS refuses them)
            raise ConfigError(f"{key} contains a NUL character ({show(value)}): remove it")
        return str(value)
    return value


def _split_list(value: str) -> list[str]:
    """``a,b(x=1,y=2),c`` -> ['a', 'b(x=1,y=2)', 'c']: commas inside parentheses belong to the item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(value):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(value[start:i])
            start = i + 1
    return items + [value[start:]]


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}?" if close else "valid keys: " + ", ".join(valid)
    return ConfigError(f"unknown config key {show(key)}: {hint}")


def _all_keys() -> list[str]:
    keys = []
    for name, tp in _hints(Config).items():
        if dataclasses.is_dataclass(tp):
            keys += [f"{name}.{f.name}" for f in dataclasses.fields(tp) if not f.metadata.get("flat")]
        else:
            keys.append(name)
    return keys + [f"attention.{p}" for p in param_owners()]


def _coerce_param(key: str, pattern_cls: type[Pattern], name: str, value: Any) -> Any:
    """A pattern parameter's value, converted to its declared type and checked against its range."""
    f = pattern_cls.parameters()[name]
    value = _coerce(key, _hints(pattern_cls)[name], value)
    _check_value(key, f, value)
    return value


def _coerce_layers(key: str, value: Any) -> list[dict]:
    """``attention.layers``: a list (or a YAML flow string from the command line) of per-layer specs."""
    if isinstance(value, str):
        try:
            value = yaml.load(value, Loader=_Loader) if value.strip() else []
        except yaml.YAMLError:
            value = None
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise ConfigError(
            f"{key} expects a list of layer specs, e.g. {key}='[{{pattern: local, window: 64}}, {{pattern: dense}}]'"
        )
    layers = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        entry = {str(k): v for k, v in entry.items()}
        cls = get_pattern(str(entry.get("pattern", "")), f"{where}.pattern") if "pattern" in entry else None
        if cls is None:
            raise ConfigError(f"{where} has no pattern: write e.g. {{pattern: local, window: 64}}")
        spec = {"pattern": cls.name}
        for name, v in entry.items():
            if name == "pattern":
                continue
            if name == "modifiers":
                spec["modifiers"] = _coerce(f"{where}.modifiers", list[str], v)
                continue
            if name not in cls.parameters():
                have = ", ".join(cls.parameters()) or "none"
                raise ConfigError(f"{where}: pattern {cls.name!r} has no parameter {name!r} (its parameters: {have})")
            spec[name] = _coerce_param(f"{where}.{name}", cls, name, v)
        layers.append(spec)
    return layers


_EXPLICIT: dict[int, set[str]] = {}  # id(section) -> field names set on it; kept out of the dataclass fields


def explicit_keys(section) -> set[str]:
    """The field names of a config section that were set by a file or an override (not left at their default)."""
    return set(_EXPLICIT.get(id(section), ()))


def _mark_explicit(section, name: str) -> None:
    if id(section) not in _EXPLICIT:
        _EXPLICIT[id(section)] = set()
        weakref.finalize(section, _EXPLICIT.pop, id(section), None)  # ids are reused once the section is gone
    _EXPLICIT[id(section)].add(name)


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key (``model.n_layer``) with type coercion; unknown keys raise."""
    parts = key.split(".")
    if parts[0] == "attention" and len(parts) == 2:
        if parts[1] == "layers":
            cfg.attention.layers = _coerce_layers(key, value)
            return
        if parts[1] in param_owners():
            cfg.attention.params[parts[1]] = _coerce_param(key, param_owners()[parts[1]][0], parts[1], value)
            return
    obj: Any = cfg
    for i, part in enumerate(parts):
        fields_ = {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("flat")}
        if part not in fields_:
            raise _unknown(key, _all_keys())
        f = fields_[part]
        sub = getattr(obj, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(sub):
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{key} is a section; set its keys, e.g. {key}.{dataclasses.fields(sub)[0].name}=..."
                    )
                for k, v in value.items():
                    set_key(cfg, f"{key}.{k}", v)
                return
            if _count_items(value, MAX_VALUE_ITEMS) > MAX_VALUE_ITEMS:  # before coercion copies it
                raise ConfigError(
                    f"{key} holds a value of more than {MAX_VALUE_ITEMS:,} items once its YAML aliases "
                    f"are expanded ({show(value)}): write the value out plainly"
                )
            value = _coerce(key, _hints(type(obj))[part], value)
            _check_value(key, f, value)
            if key == "attention.plugins":
                for ref in value:  # their patterns' keys become known
                    load_plugin(ref)
            setattr(obj, part, value)
            _mark_explicit(obj, part)
            return
        if not dataclasses.is_dataclass(sub):
            raise _unknown(key, _all_keys())
        obj = sub


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (YAML would silently keep the last one)."""

    def __init__(self, key: str, first_line: int, second_line: int, mark):
        self.key, self.lines = key, (first_line, second_line)
        super().__init__(
            None, None, f"{show(key)} appears twice (lines {first_line} and {second_line}): keep one of them", mark
        )


class _Loader(yaml.SafeLoader):
    """Safe YAML with 1.2 booleans (only true/false, so `wandb: off` stays the string 'off') and no duplicate keys."""

    def construct_document(self, node):
        _check_duplicates(node, "", set())
        return super().construct_document(node)


def _check_duplicates(node, path: str, seen: set[int]) -> None:
    """Refuse a key given twice in one mapping, naming its dotted path; each node is visited once (aliases)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                dotted = f"{path}.{key}" if path else key
                if key in lines:
                    raise DuplicateKeyError(dotted, lines[key], key_node.start_mark.line + 1, key_node.start_mark)
                lines[key] = key_node.start_mark.line + 1
                _check_duplicates(value_node, dotted, seen)
            else:
                _check_duplicates(value_node, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]", seen)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_override(arg: str) -> tuple[str, Any]:
    """``key=value``; the value stays a string and is converted by the field's type."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not key=value: write e.g. model.n_layer=8")
    key, value = arg.split("=", 1)
    return key.strip(), value.strip()


def _load_plugins(d: dict, overrides: Sequence[str]) -> None:
    """Import ``attention.plugins`` first, so the keys of the patterns they register are known."""
    plugins = list((d.get("attention") or {}).get("plugins") or []) if isinstance(d.get("attention"), dict) else []
    for arg in overrides:
        key, value = parse_override(arg)
        if key == "attention.plugins":
            plugins = _coerce(key, list[str], value)
    for ref in plugins:
        load_plugin(str(ref))


def apply_pattern_spec(cfg: Config, spec: str, aliases: dict[str, str] | None = None) -> Config:
    """Give every layer of ``cfg`` the pattern of ``spec``: ``name`` or ``name:key=value:...``, the one syntax of
    pattern specs on the command line (bench attention, bench generate). Bare keys are attention keys
    (``local:window=256``; ``plugins=file.py`` loads a plugin); ``aliases`` maps other keys to config keys."""
    name, *items = (s.strip() for s in spec.split(":"))
    try:
        if not name or "=" in name:
            raise ConfigError(
                "no pattern name comes first: write name:key=value (put config overrides before --patterns)"
            )
        pairs = []
        for item in items:
            if "=" not in item:
                raise ConfigError(f"{item!r} is not key=value")
            pairs.append(tuple(s.strip() for s in item.split("=", 1)))
        for key, value in sorted(pairs, key=lambda kv: kv[0] not in ("plugins", "attention.plugins")):  # plugins first
            key = (aliases or {}).get(key, key)
            set_key(cfg, key if "." in key else f"attention.{key}", value)
        set_key(cfg, "attention.layers", [])
        set_key(cfg, "attention.schedule", [])
        set_key(cfg, "attention.pattern", name)
        return cfg
    except ConfigError as e:
        raise ConfigError(
            f"pattern spec {spec!r}: {e} (write name or name:key=value:..., e.g. local:window=256)"
        ) from None


def from_dict(d: dict, overrides: Sequence[str] = ()) -> Config:
    _load_plugins(d or {}, overrides)
    cfg = Config()
    for k, v in (d or {}).items():
        set_key(cfg, str(k), v)
    for arg in overrides:
        set_key(cfg, *parse_override(arg))
    _settings_from_dataset(cfg)
    return cfg.validate()


def _settings_from_dataset(cfg: Config) -> None:
    """With data.dir naming a prepared dataset, the data.* keys not given come from its meta.json.

    So ``data.dir`` alone reuses a dataset; keys given that differ are refused when it is opened."""
    if not cfg.data.dir:
        return
    import json

    try:
        prepared = json.loads((Path(cfg.data.dir) / "meta.json").read_text(encoding="utf-8")).get("data_config")
    except (OSError, ValueError, AttributeError):
        return  # not prepared yet (or unreadable: opening it says why)
    if not isinstance(prepared, dict):
        return
    given = explicit_keys(cfg.data) | {"dir"}
    for f in dataclasses.fields(DataConfig):
        if f.name in prepared and f.name not in given:
            set_key(cfg, f"data.{f.name}", prepared[f.name])


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML preset (or defaults when path is None) and apply overrides."""
    d = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found: pass a YAML file such as configs/quickstart.yaml")
        d = _read_yaml(p)
        if not isinstance(d, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections: see configs/quickstart.yaml")
    return from_dict(d, overrides)


def _read_yaml(p: Path) -> Any:
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {str(p)!r} is not a UTF-8 text file (byte {e.start}): pass a YAML file "
            "such as configs/quickstart.yaml"
        ) from None
    try:
        return yaml.load(text, Loader=_Loader) or {}
    except DuplicateKeyError as e:
        raise ConfigError(
            f"config file {str(p)!r} has the key {show(e.key)} twice (lines {e.lines[0]} and "
            f"{e.lines[1]}): keep one of them"
        ) from None
    except yaml.YAMLError as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        first = first if len(first) <= SHOW_LIMIT else first[:SHOW_LIMIT] + "..."
        raise ConfigError(f"config file {str(p)!r} is not valid YAML ({first}): fix its syntax") from None


def to_dict(cfg: Config) -> dict:
    """Plain nested dicts, with the attention parameters flat in their section (as config.yaml holds them)."""
    d = dataclasses.asdict(cfg)
    attention = d["attention"]
    del attention["params"]
    attention.update(cfg.attention.resolved_params())
    return d


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump(cfg))


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
