"""A run as a Hugging Face ``transformers`` folder that loads without custom code.

Only configurations that ``transformers`` computes exactly the same way are exported:

- learned positions + LayerNorm + GELU (exact erf) or ReLU + dense attention -> ``GPT2LMHeadModel``
  (its Conv1D layers hold the transposed weights; the fused qkv is q, k, v in both);
- RoPE + RMSNorm + SwiGLU + dense attention -> ``LlamaForCausalLM`` (attnlab's rotary embedding is
  the half-split, rotate-half layout Llama uses, so q and k need no permutation; grouped-query
  attention maps to ``num_key_value_heads``);
- the same with ``local(w)`` attention on every layer -> ``MistralForCausalLM`` with
  ``sliding_window = w``: both let query i see key j when i - j < w;
- the Llama shape with QK-norm (a learned RMSNorm over each head's queries and keys, before RoPE),
  dense attention and no biases -> ``Qwen3ForCausalLM``, which normalises q and k the same way.

Everything else (other patterns, image embeddings, narrower queries/keys, post-norm,
score modifiers, ...) is refused with one line naming the config key that does not map. Nothing
here imports ``transformers``: the folder is plain JSON and safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..attention.patterns import Dense, Local
from ..config import Config, ModelConfig
from ..data.text import EOS, UNK, BPETokenizer, ByteTokenizer, CharTokenizer
from ..errors import ConfigError, UserError
from ..model.gpt import GPT, mlp_hidden
from ..run.open import load_run

# ModelConfig fields that only shape training (or whose effect is read from the built model): any value exports.
TRAINING_ONLY = {
    "dropout",
    "attn_dropout",
    "init",
    "init_std",
    "checkpoint_activations",
    "zero_init_logits",
    "tie_weights",
    "mlp_hidden",
    "mlp_ratio",
    "context",
    "n_layer",
    "n_head",
    "d_model",
    "image_shape",
    "eos_id",
}
# Fields checked below, target by target.
CHECKED = {"position", "norm", "norm_position", "mlp", "qk_ratio", "qk_norm", "bias", "n_kv_head"}


class ExportError(ConfigError):
    """The run's model has no exact counterpart in transformers."""


def _refuse(what: str, fix: str) -> ExportError:
    return ExportError(f"cannot export to Hugging Face: {what}; {fix}")


# ------------------------------------------------------------------ which architecture


@dataclasses.dataclass(frozen=True)
class Target:
    arch: str  # gpt2, llama, mistral or qwen3
    window: int | None  # mistral's sliding window


def plan(model: GPT, cfg: Config) -> Target:
    """The transformers architecture computing exactly what ``model`` computes, or ExportError naming the key."""
    m = cfg.model
    if m.position not in ("learned", "rope"):
        raise _refuse(
            f"model.position={m.position} has no counterpart", "GPT-2 needs model.position=learned, Llama rope"
        )
    _check_unknown_fields(m)
    _check_shared(m)
    window = _attention_window(model, cfg)
    if m.position == "learned":
        _check_gpt2(model, m, window)
        return Target("gpt2", None)
    _check_llama(m, window)
    if m.qk_norm:
        _check_qwen3(model, m, window)
        return Target("qwen3", None)
    return Target("mistral" if window is not None else "llama", window)


def _check_unknown_fields(m: ModelConfig) -> None:
    for f in dataclasses.fields(m):
        if f.name in TRAINING_ONLY | CHECKED:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(m, f.name) != default:
            raise _refuse(f"model.{f.name}={getattr(m, f.name)!r} has no counterpart", f"use the default {default!r}")


def _check_shared(m: ModelConfig) -> None:
    if m.norm_position != "pre":
        raise _refuse(f"model.norm_position={m.norm_position} (post-norm blocks)", "GPT-2 and Llama are pre-norm")
    if m.qk_ratio != 1.0:
        raise _refuse(f"model.qk_ratio={m.qk_ratio} (queries/keys narrower than values)", "only qk_ratio=1 maps")


def _attention_window(model: GPT, cfg: Config) -> int | None:
    """None when every layer is dense; w when every layer is local(w); else ExportError naming the layer's key."""
    if getattr(cfg.attention, "document_mask", False):
        raise _refuse(
            "attention.document_mask=true (attention within documents)",
            "transformers' GPT-2, Llama, Mistral and Qwen3 attend across <eos>",
        )
    modifiers = getattr(cfg.attention, "modifiers", None)
    if modifiers:
        raise _refuse(
            f"attention.modifiers={','.join(map(str, modifiers))} (score modifiers)",
            "transformers' GPT-2, Llama, Mistral and Qwen3 add nothing to the attention scores",
        )
    windows = set()
    for i, block in enumerate(model.blocks):
        core = block.attn.core
        if getattr(core, "modifier", None) is not None:
            raise _refuse(f"layer {i} modifies its attention scores", "export a model without score modifiers")
        pattern = core.pattern
        if type(pattern) is Dense:
            windows.add(None)
        elif type(pattern) is Local:
            windows.add(pattern.window)
        else:
            raise _refuse(
                f"{_layer_key(cfg, i)}={pattern.name} (layer {i}) has no counterpart",
                "only dense attention, or local attention on every layer (as Mistral's sliding window), maps",
            )
    if len(windows) > 1:
        raise _refuse(
            "layers differ in their attention ("
            + ", ".join("dense" if w is None else f"local({w})" for w in sorted(windows, key=str))
            + ")",
            "transformers' models use one attention for every layer",
        )
    return windows.pop()


def _layer_key(cfg: Config, i: int) -> str:
    a = cfg.attention
    layers = getattr(a, "layers", None)
    if layers:
        return f"attention.layers[{i % len(layers)}].pattern"
    return "attention.schedule" if a.schedule else "attention.pattern"


def _check_gpt2(model: GPT, m: ModelConfig, window: int | None) -> None:
    if m.norm != "layernorm":
        raise _refuse(f"model.norm={m.norm} with learned positions", "GPT-2 uses model.norm=layernorm")
    if m.mlp == "swiglu":
        raise _refuse(
            "model.mlp=swiglu with learned positions",
            "GPT-2's MLP is gelu or relu (Llama's SwiGLU needs model.position=rope)",
        )
    if m.qk_norm:
        raise _refuse(
            "model.qk_norm=true with learned positions",
            "GPT-2 has no norm on queries and keys (Qwen3's QK-norm needs model.position=rope)",
        )
    if window is not None:
        raise _refuse(
            f"attention.pattern=local (window {window}) with learned positions",
            "GPT-2 has no sliding window; local attention maps for Llama-shaped models "
            "(model.position=rope, model.norm=rmsnorm, model.mlp=swiglu), as Mistral",
        )
    if (getattr(m, "n_kv_head", None) or m.n_head) != m.n_head:
        raise _refuse(
            f"model.n_kv_head={m.n_kv_head} with learned positions", "GPT-2 has one key/value head per query head"
        )
    _gpt2_activation(model)


def _check_llama(m: ModelConfig, window: int | None) -> None:
    if m.norm != "rmsnorm":
        raise _refuse(f"model.norm={m.norm} with RoPE", "Llama uses model.norm=rmsnorm")
    if m.mlp != "swiglu":
        raise _refuse(f"model.mlp={m.mlp} with RoPE", "Llama uses model.mlp=swiglu")
    if window is not None and m.bias:
        raise _refuse("model.bias=true with local attention", "Mistral has no biases: use model.bias=false")


def _check_qwen3(model: GPT, m: ModelConfig, window: int | None) -> None:
    if window is not None:
        raise _refuse(
            f"model.qk_norm=true with local attention (window {window})",
            "QK-norm exports as Qwen3 with dense attention only",
        )
    if m.bias:
        raise _refuse("model.bias=true with QK-norm", "Qwen3's MLP has no biases: use model.bias=false")
    attn, norm = model.blocks[0].attn, model.blocks[0].norm1
    if attn.q_norm.eps != norm.eps:  # Qwen3 has one epsilon for every norm
        raise _refuse(f"QK-norm epsilon {attn.q_norm.eps} differs from the blocks' {norm.eps}", "use one epsilon")


def _gpt2_activation(model: GPT) -> str:
    act = model.blocks[0].mlp.act
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]  # erf GELU / tanh GELU, both exact
    raise _refuse(f"the MLP activation {type(act).__name__}", "GPT-2 exports gelu or relu")


# ------------------------------------------------------------------ config.json


def _common_config(model: GPT, cfg: Config, eos_id: int) -> dict:
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")  # the checkpoint's, kept as it is
    return {
        "vocab_size": model.vocab_size,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": bool(model.tied),
        "torch_dtype": dtype,
        "dtype": dtype,
        "attnlab_version": __version__,
    }


def gpt2_config(model: GPT, cfg: Config, eos_id: int) -> dict:
    m, ln = cfg.model, model.blocks[0].norm1
    attn_drop = getattr(m, "attn_dropout", None)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_positions": m.context,
        "n_embd": m.d_model,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": mlp_hidden(m),
        "activation_function": _gpt2_activation(model),
        "layer_norm_epsilon": ln.eps,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout if attn_drop is None else attn_drop,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        **_common_config(model, cfg, eos_id),
    }


def llama_config(model: GPT, cfg: Config, eos_id: int, target: Target) -> dict:
    m = cfg.model
    eps = model.blocks[0].norm1.eps
    eps = torch.finfo(torch.float32).eps if eps is None else eps  # torch's RMSNorm default: the dtype's epsilon
    attn_drop = getattr(m, "attn_dropout", None)
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.d_model,
        "intermediate_size": mlp_hidden(m),
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": getattr(m, "n_kv_head", None) or m.n_head,
        "head_dim": m.d_model // m.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": m.context,
        "rms_norm_eps": eps,
        "rope_theta": model.pos_emb.base,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.pos_emb.base},
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "attention_dropout": m.dropout if attn_drop is None else attn_drop,
        "pretraining_tp": 1,
        **_common_config(model, cfg, eos_id),
    }
    if target.arch == "mistral":
        del out["attention_bias"], out["mlp_bias"], out["pretraining_tp"]
        out.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=target.window)
    if target.arch == "qwen3":
        del out["mlp_bias"], out["pretraining_tp"]
        out.update(
            architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False, sliding_window=None
        )
    return out


# ------------------------------------------------------------------ weights


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu").contiguous().clone()


def _norm(prefix: str, norm: nn.Module, bias: bool) -> dict:
    out = {f"{prefix}.weight": _t(norm.weight)}
    if bias:  # GPT-2's LayerNorm always has a bias: a missing one is zero
        out[f"{prefix}.bias"] = _t(norm.bias) if norm.bias is not None else torch.zeros_like(norm.weight)
    return out


def _linear_bias(linear: nn.Linear) -> torch.Tensor:
    return _t(linear.bias) if linear.bias is not None else torch.zeros(linear.out_features)


def gpt2_weights(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict: Conv1D layers hold [in, out] weights, the transpose of nn.Linear's."""
    w = {"transformer.wte.weight": _t(model.tok_emb.weight), "transformer.wpe.weight": _t(model.pos_emb.weight)}
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}"
        w |= _norm(f"{p}.ln_1", b.norm1, bias=True) | _norm(f"{p}.ln_2", b.norm2, bias=True)
        for name, linear in (
            ("attn.c_attn", b.attn.qkv),
            ("attn.c_proj", b.attn.proj),
            ("mlp.c_fc", b.mlp.fc),
            ("mlp.c_proj", b.mlp.proj),
        ):
            w[f"{p}.{name}.weight"] = _t(linear.weight.T)
            w[f"{p}.{name}.bias"] = _linear_bias(linear)
    w |= _norm("transformer.ln_f", model.norm_f, bias=True)
    if not model.tied:
        w["lm_head.weight"] = _t(model.lm_head.weight)
    return w


def llama_weights(model: GPT, bias: bool) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's (and MistralForCausalLM's) state dict: the fused qkv and gate/up projections split."""
    w = {"model.embed_tokens.weight": _t(model.tok_emb.weight), "model.norm.weight": _t(model.norm_f.weight)}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = _t(b.norm1.weight)
        w[f"{p}.post_attention_layernorm.weight"] = _t(b.norm2.weight)
        parts = {f"self_attn.{n}_proj": x for n, x in zip("qkv", _split(b.attn.qkv, b.attn.sizes))}
        parts["self_attn.o_proj"] = (b.attn.proj.weight, b.attn.proj.bias)
        hidden = b.mlp.fc.out_features // 2
        gate, up = _split(b.mlp.fc, (hidden, hidden))  # SwiGLU: silu(first half) * second half
        parts |= {"mlp.gate_proj": gate, "mlp.up_proj": up, "mlp.down_proj": (b.mlp.proj.weight, b.mlp.proj.bias)}
        for name, (weight, b_) in parts.items():
            w[f"{p}.{name}.weight"] = _t(weight)
            if bias:
                w[f"{p}.{name}.bias"] = _t(b_)
    if not model.tied:
        w["lm_head.weight"] = _t(model.lm_head.weight)
    return w


def qwen3_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Qwen3ForCausalLM's state dict: Llama's (without biases) and each layer's q_norm and k_norm."""
    w = llama_weights(model, bias=False)
    for i, b in enumerate(model.blocks):
        w[f"model.layers.{i}.self_attn.q_norm.weight"] = _t(b.attn.q_norm.weight)
        w[f"model.layers.{i}.self_attn.k_norm.weight"] = _t(b.attn.k_norm.weight)
    return w


def _split(linear: nn.Linear, sizes) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    weights = linear.weight.split(list(sizes), dim=0)
    biases = linear.bias.split(list(sizes)) if linear.bias is not None else [None] * len(weights)
    return list(zip(weights, biases))


# ------------------------------------------------------------------ tokenizer


def tokenizer_json(tokenizer) -> str:
    """The run's tokenizer as a ``tokenizers`` JSON whose encoding starts with ``<eos>``, as attnlab reads a document."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    if isinstance(tokenizer, BPETokenizer):
        tok = Tokenizer.from_str(tokenizer._tok.to_str())
        start = EOS
    elif isinstance(tokenizer, ByteTokenizer):  # id = byte value; <eos> is byte 0, written as its byte-level character
        alphabet = _byte_alphabet()
        tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        start = alphabet[0]
    elif isinstance(tokenizer, CharTokenizer):  # one token per character, <unk> for characters not seen in training
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.vocab)}, merges=[], unk_token=UNK))
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([EOS, UNK])
        start = EOS
    else:
        raise UserError(f"cannot export the tokenizer {tokenizer!r}: only bpe, bytes and char tokenizers export")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{start} $A", pair=f"{start} $A {start} $B:1", special_tokens=[(start, tokenizer.eos_id)]
    )
    return tok.to_str()


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def tokenizer_files(tokenizer, context: int) -> dict[str, str]:
    start = _byte_alphabet()[0] if isinstance(tokenizer, ByteTokenizer) else EOS
    special = {"bos_token": start, "eos_token": start}
    if isinstance(tokenizer, CharTokenizer):
        special["unk_token"] = UNK
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": context,
        # attnlab encodes a literal "<eos>" in text as text, never as the separator
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": tokenizer_json(tokenizer),
        "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
    }


# ------------------------------------------------------------------ the folder


def export_hf(
    run_dir: str | Path, out: str | Path, *, checkpoint: str | Path | None = None, force: bool = False, **load_options
) -> dict:
    """Write ``out``: config.json, model.safetensors, generation_config.json and the tokenizer files.

    ``load_options`` go to ``runs.load_run`` (such as where the run's dataset is now)."""
    out = Path(out)
    _check_target(out, force)
    run = load_run(run_dir, checkpoint, device="cpu", need_data=False, **load_options)  # the run's copies suffice
    if run.dataset.kind == "image" or run.dataset.tokenizer is None:
        raise _refuse(
            f"{run.dir} models images (data.source={run.cfg.data.source}: bytes of pixels, no tokenizer)",
            "only text runs export",
        )
    target = plan(run.model, run.cfg)
    eos = run.dataset.tokenizer.eos_id
    if target.arch == "gpt2":
        config, weights = gpt2_config(run.model, run.cfg, eos), gpt2_weights(run.model)
    else:
        config = llama_config(run.model, run.cfg, eos, target)
        weights = qwen3_weights(run.model) if target.arch == "qwen3" else llama_weights(run.model, run.cfg.model.bias)
    files = tokenizer_files(run.dataset.tokenizer, run.cfg.model.context)
    files["config.json"] = json.dumps(config, indent=2)
    files["generation_config.json"] = json.dumps({"bos_token_id": eos, "eos_token_id": eos}, indent=2)
    files["attnlab_export.json"] = json.dumps(
        {
            "run": str(run.dir),
            "checkpoint": str(run.checkpoint),
            "architecture": config["architectures"][0],
            "attnlab_version": __version__,
        },
        indent=2,
    )
    _write_folder(out, files, weights, force)
    return {
        "out": str(out),
        "architecture": config["architectures"][0],
        "checkpoint": str(run.checkpoint),
        "params": sum(t.numel() for t in weights.values()),
        "sliding_window": target.window,
    }


def _check_target(out: Path, force: bool) -> None:
    """An empty or missing folder; with ``force`` also an earlier export (never any other folder or file)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not force:
        raise UserError(
            f"{out} exists and is not empty: choose another --out folder or pass --force to replace an export"
        )
    if not (out / "attnlab_export.json").is_file():
        raise UserError(
            f"{out} is not an attnlab export folder (no attnlab_export.json): --force replaces only "
            "an earlier export; choose another --out folder"
        )


def _write_folder(out: Path, files: dict[str, str], weights: dict[str, torch.Tensor], force: bool) -> None:
    """Everything into a temporary folder beside ``out``, then one rename: never a half-written folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)  # empty, or an earlier export given --force (_check_target)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["ExportError", "Target", "export_hf", "gpt2_weights", "llama_weights", "plan", "tokenizer_files"]
