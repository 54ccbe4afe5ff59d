"""The GPT model: embeddings -> N x Block(attention, MLP) -> logits.

Parameter names are a contract the optimizer relies on (Muon takes the 2-D
weights under ``blocks.``, AdamW the rest): ``tok_emb.weight``, ``pos_emb.*``,
``blocks.{i}.*``, ``norm_f.*``, ``lm_head.weight``.

Attention is reached only through ``attnlab.attention.Attention``; this file
knows nothing about patterns or backends. The dense path matches a plain
nanoGPT block op for op (fused qkv, one view/transpose per tensor, SDPA).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import Attention
from ..attention.backends import attention_dropout
from ..attention.cache import LayerCache, ModelCache, cache_streams, make_cache
from ..attention.documents import Documents, documents
from ..attention.modifiers import modifier_specs
from ..config import AttentionConfig, ModelConfig
from ..errors import ConfigError
from .embeddings import Rotary, apply_rotary, build_positional

RopeCache = tuple[torch.Tensor, torch.Tensor] | None
# Encodings that let a bounded cache decode past the training context: relative (RoPE, ALiBi) or none.
STREAMING_POSITIONS = ("rope", "none", "alibi")
# Child et al. 2019, section 6: weights N(0, 0.125 / sqrt(fan_in)), embeddings N(0, 0.125 / sqrt(d * n_emb)).
SPARSE_TRANSFORMER_GAIN = 0.125


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim)
    return nn.LayerNorm(dim, bias=cfg.bias)


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over the head dimension for QK-norm; its weight follows the input dtype.

    Under autocast q and k arrive in bf16 while the weight is fp32; casting the
    weight keeps the fused kernel and the dtype the attention backend expects.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def mlp_hidden(cfg: ModelConfig) -> int:
    """Hidden width; for SwiGLU the width of each of its two input projections."""
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    if cfg.mlp_ratio is not None:
        return round(cfg.mlp_ratio * cfg.d_model)
    if cfg.mlp == "swiglu":
        # 8/3 * d keeps SwiGLU's three matrices at the parameter count of a 4*d two-matrix MLP.
        return -(-(8 * cfg.d_model // 3) // 8) * 8  # int(8/3 * d) rounded up to a multiple of 8
    return 4 * cfg.d_model


def qk_head_size(cfg: ModelConfig) -> int:
    """Query/key width per head: qk_ratio * d_model/n_head (``ModelConfig.check`` makes it whole)."""
    return round(cfg.qk_ratio * (cfg.d_model // cfg.n_head))


def kv_heads(cfg: ModelConfig) -> int:
    """Key/value heads: ``model.n_kv_head`` (grouped-query attention), default one per query head."""
    return cfg.n_kv_head or cfg.n_head


class SelfAttention(nn.Module):
    """Fused qkv projection, optional QK-norm and RoPE, the attention interface, output projection.

    Queries and keys may be narrower than values (``model.qk_ratio``), and keys and
    values may have fewer heads than queries (``model.n_kv_head``): the fused
    projection is d -> dqk * (1 + n_kv_head/n_head) + d * n_kv_head/n_head, so one
    Linear (and one parameter name) serves every ratio.
    """

    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        d, self.n_head, self.n_kv_head = cfg.d_model, cfg.n_head, kv_heads(cfg)
        self.qk_head, self.v_head = qk_head_size(cfg), d // cfg.n_head
        dqk = self.qk_head * cfg.n_head
        self.sizes = (dqk, self.qk_head * self.n_kv_head, self.v_head * self.n_kv_head)
        self.qkv = nn.Linear(d, sum(self.sizes), bias=cfg.bias)
        self.proj = nn.Linear(d, d, bias=cfg.bias)
        self.q_norm = HeadRMSNorm(self.qk_head) if cfg.qk_norm else None
        self.k_norm = HeadRMSNorm(self.qk_head) if cfg.qk_norm else None
        self.core = Attention(
            attn_cfg,
            layer_idx,
            cfg.n_layer,
            cfg.n_head,
            attention_dropout(cfg),
            modifier_specs(attn_cfg, cfg, layer_idx),
        )
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeCache = None,
        cache: LayerCache | None = None,
        sink_shift: RopeCache = None,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        """Without ``cache``: attention over x. With one: an empty cache is filled from x (the prompt);
        otherwise x is the next position and attends to the cache (``sink_shift``: see attention.cache).
        ``docs``: document masking (a query sees keys of its own document only)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.sizes, dim=2)
        q = q.view(B, T, self.n_head, self.qk_head).transpose(1, 2)  # [B, H, T, Dqk]
        k = k.view(B, T, self.n_kv_head, self.qk_head).transpose(1, 2)  # [B, Hkv, T, Dqk]
        v = v.view(B, T, self.n_kv_head, self.v_head).transpose(1, 2)  # [B, Hkv, T, Dv]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:  # where the last position's document begins: the cache masks keys before it
            cache.doc_start = None if docs is None else docs.starts[:, -1]
        if cache is None or cache.length == 0:
            y = self.core(q, k, v) if docs is None else self.core(q, k, v, docs.ids)
            if cache is not None:
                cache.prefill(k, v)
        else:
            shift = None if sink_shift is None else (lambda keys: apply_rotary(keys, *sink_shift))
            y = cache.step(q, k, v, cache.length, shift)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Two-layer MLP (GELU/ReLU), or SwiGLU with its gate and up projections fused into one Linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.swiglu = cfg.mlp == "swiglu"
        self.fc = nn.Linear(cfg.d_model, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.act = nn.ReLU() if cfg.mlp == "relu" else nn.GELU()
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        return self.drop(self.proj(h))


class Block(nn.Module):
    """One transformer layer: attention and MLP sub-layers, each with a residual and a norm (pre or post)."""

    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = make_norm(cfg, cfg.d_model)
        self.attn = SelfAttention(cfg, attn_cfg, layer_idx)
        self.norm2 = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeCache = None,
        cache: LayerCache | None = None,
        sink_shift: RopeCache = None,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, cache, sink_shift, docs)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, cache, sink_shift, docs))
        return self.norm2(x + self.mlp(x))


class GPT(nn.Module):
    """Decoder-only transformer: idx [B, T] -> logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, vocab_size: int):
        super().__init__()
        cfg.check()
        if cfg.position.startswith("image") and len(cfg.image_shape) != 3:
            raise ConfigError(
                f"model.position={cfg.position} needs model.image_shape=[height,width,channels]: train on an image "
                "dataset (its shape is taken from there) or set e.g. model.image_shape=32,32,3"
            )
        self.cfg, self.attn_cfg, self.vocab_size = cfg, attn_cfg, vocab_size
        self.document_mask = bool(getattr(attn_cfg, "document_mask", False))
        self.position_reset = cfg.position_reset == "document"
        self.eos_id = cfg.eos_id
        if (self.document_mask or self.position_reset) and self.eos_id is None:
            key = "attention.document_mask=true" if self.document_mask else "model.position_reset=document"
            raise ConfigError(
                f"{key} needs the id of the document separator <eos>: train on a text dataset "
                "(its id is taken from there) or set model.eos_id"
            )
        self.context = cfg.context
        self.max_len = cfg.context  # longest full forward; longer_windows() raises it for evaluation past the context

        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = build_positional(cfg.position, cfg.context, cfg.d_model, qk_head_size(cfg), cfg.image_shape)
        self.rotary = isinstance(self.pos_emb, Rotary)  # rotary goes to q/k; the others add to x
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, attn_cfg, i) for i in range(cfg.n_layer))
        # Post-norm blocks already end in a norm.
        self.norm_f = make_norm(cfg, cfg.d_model) if cfg.norm_position == "pre" else None
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        # The Sparse Transformer starts its output layer at zero, and a zero-initialised
        # tied embedding would give every token the same zero vector: untie.
        self.zero_logits = cfg.zero_init_logits or cfg.init == "sparse_transformer"
        self.tied = cfg.tie_weights and not self.zero_logits
        if self.tied:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    # ------------------------------------------------------------ init

    def _init_weights(self) -> None:
        """``model.init``: gpt2 (N(0, init_std)), xavier (uniform Glorot), or sparse_transformer.

        sparse_transformer is Child et al. 2019, "Generating Long Sequences with Sparse
        Transformers" (arXiv:1904.10509): section 6 draws every attention and feed-forward
        weight from N(0, 0.125/sqrt(fan_in)) with zero biases, the token embedding from
        N(0, 0.125/sqrt(d)), each of the n_emb position embeddings from N(0, 0.125/sqrt(d*n_emb)),
        and starts the output logits at zero; section 5.2 scales the attention output
        projection W_p and the feed-forward output W_2 by 1/sqrt(2N), N the number of layers,
        the same factor for every layer. The N(0, s) there names the standard deviation.

        mainrun is the mainrun challenge's train.py: every weight N(0, init_std) with no residual
        scaling, and its learned position table starts at zero.
        """
        # Residual output projections: scaled so the residual stream's variance does not grow with depth.
        residual = {id(m) for b in self.blocks for m in (b.attn.proj, b.mlp.proj)}
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.tied:
                    continue  # the shared matrix gets the embedding init below
                self._init_linear(module, id(module) in residual)
            elif isinstance(module, nn.Embedding):  # token, learned position and image tables
                nn.init.normal_(module.weight, mean=0.0, std=self._embedding_std(module))
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.zero_logits:
            nn.init.zeros_(self.lm_head.weight)
        if self.cfg.init == "mainrun" and isinstance(self.pos_emb, nn.Embedding):
            nn.init.zeros_(self.pos_emb.weight)

    def _init_linear(self, module: nn.Linear, residual: bool) -> None:
        cfg = self.cfg
        depth = 1 / math.sqrt(2 * cfg.n_layer) if residual and cfg.init != "mainrun" else 1.0
        if cfg.init in ("gpt2", "mainrun"):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std * depth)
        elif cfg.init == "sparse_transformer":
            nn.init.normal_(
                module.weight, mean=0.0, std=SPARSE_TRANSFORMER_GAIN / math.sqrt(module.in_features) * depth
            )
        else:
            nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

    def _embedding_std(self, module: nn.Embedding) -> float:
        cfg = self.cfg
        if cfg.init != "sparse_transformer":
            return cfg.init_std
        # Position tables are summed (n_emb of them: 1 learned, 3 image, 4 image+learned): each gets 1/sqrt(n_emb).
        n_emb = 1 if module is self.tok_emb else sum(isinstance(m, nn.Embedding) for m in self.pos_emb.modules())
        return SPARSE_TRANSFORMER_GAIN / math.sqrt(cfg.d_model * n_emb)

    # ------------------------------------------------------------ forward

    def forward(self, idx: torch.Tensor, cache: ModelCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] (``last_only``: [B, 1, vocab]) for idx [B, T].

        With ``cache`` (``new_cache``): an empty cache is filled from idx, a
        filled one takes idx as the next position (T = 1) and decodes from it.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        self._check_length(start, T, cache)
        docs = self._documents(idx, start, cache)
        positions = docs.positions(start) if docs is not None and self.position_reset else None
        masking = docs if self.document_mask else None
        x = self.tok_emb(idx)
        rope = sink_shift = None
        if self.rotary:
            rope = self.pos_emb(T, offset=start, positions=positions)
            if start >= self.context:  # streaming: the sinks see this query at the context's last position
                sink_shift = self.pos_emb(T, offset=start - (self.context - 1))
        elif self.pos_emb is not None:
            x = x + self.pos_emb(T, offset=start, positions=positions)
        x = self.drop(x)
        recompute = self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if recompute:  # keep only the block's input; backward reruns it with the same RNG state (dropout masks)
                x = checkpoint(block, x, rope, None, None, masking, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, rope, None if cache is None else cache.layers[i], sink_shift, masking)
        if last_only:
            x = x[:, -1:]
        if self.norm_f is not None:
            x = self.norm_f(x)
        return self.lm_head(x)

    def _documents(self, idx: torch.Tensor, start: int, cache: ModelCache | None) -> Documents | None:
        """The documents of ``idx`` (continuing the cache's), when document masking or position reset needs them."""
        if not (self.document_mask or self.position_reset):
            return None
        assert self.eos_id is not None  # __init__ refuses otherwise
        docs = documents(idx, self.eos_id, start, None if cache is None or start == 0 else cache.docs)
        if cache is not None:
            cache.docs = docs.state(idx, self.eos_id)
        return docs

    def extrapolation_refusal(self) -> str | None:
        """Why this model cannot run a window longer than its training context (None: it can).

        Relative (RoPE) or no positions give every longer window a defined meaning; a learned, sinusoidal
        or image position table has nothing to give past the length it was trained on."""
        if self.cfg.position in STREAMING_POSITIONS:
            return None
        return (
            f"model.position={self.cfg.position} has no positions past the training context "
            f"{self.context} (only rope and none extrapolate)"
        )

    @contextlib.contextmanager
    def longer_windows(self, n: int):
        """Within the block, full forwards may take up to ``n`` tokens (ValueError if the model cannot)."""
        if n > self.context and self.extrapolation_refusal():
            raise ValueError(self.extrapolation_refusal())
        old, self.max_len = self.max_len, max(n, self.context)
        try:
            yield self
        finally:
            self.max_len = old

    def _check_length(self, start: int, T: int, cache: ModelCache | None) -> None:
        if start and T != 1:
            raise ValueError(f"a filled KV cache takes one token per call, got {T}")
        if start + T > self.max_len and not (start and self.can_stream(cache)):
            raise ValueError(
                f"sequence length {start + T} exceeds the model context {self.context}: feed at most {self.context} tokens"
            )

    # ------------------------------------------------------------ decoding

    def new_cache(self, batch: int, max_len: int) -> ModelCache:
        """Empty KV caches (one per layer, chosen from its pattern) for up to ``max_len`` positions."""
        streams = self.cfg.position in STREAMING_POSITIONS
        layers = []
        for block in self.blocks:
            core = block.attn.core
            limit = max_len if streams and cache_streams(core.pattern) else min(max_len, self.context)
            layers.append(
                make_cache(
                    core.pattern,
                    batch,
                    self.cfg.n_head,
                    limit,
                    n_kv_head=block.attn.n_kv_head,
                    modifier=core.modifier,
                    context=self.context,
                )
            )
        return ModelCache(layers, self.context)

    def can_stream(self, cache: ModelCache | None) -> bool:
        """Whether decoding with ``cache`` may go past the training context: bounded caches, relative (RoPE, ALiBi)
        or no positions, and score modifiers that are relative or position-free."""
        return (
            cache is not None
            and cache.streams
            and self.cfg.position in STREAMING_POSITIONS
            and not self.position_reset  # positions within a document that outgrows the context were never trained
        )

    # ------------------------------------------------------------ reporting

    def num_params(self, non_embedding: bool = False) -> int:
        """Trainable parameters, each shared tensor once.

        ``non_embedding`` leaves out the token embedding table (and with it a
        tied lm_head) and learned position (or image data) embeddings, as in
        Kaplan et al.; an untied lm_head is still counted.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= sum(p.numel() for p in self.pos_emb.parameters())
        return n

    def resolve_backends(self, device: torch.device | str) -> list[str]:
        """Choose every layer's attention backend for ``device``; a forced backend that cannot run there raises."""
        return [block.attn.core.resolve(device) for block in self.blocks]

    def describe(self) -> dict:
        """Parameter counts, layer sizes and each layer's attention, for the ``model_info`` event."""
        return {
            "n_params": self.num_params(),
            "n_params_non_embedding": self.num_params(non_embedding=True),
            "tied_weights": self.tied,
            "mlp_hidden": mlp_hidden(self.cfg),
            "qk_head_size": qk_head_size(self.cfg),
            "v_head_size": self.cfg.d_model // self.cfg.n_head,
            "n_kv_head": kv_heads(self.cfg),
            "checkpoint_activations": self.cfg.checkpoint_activations,
            "attention": [block.attn.core.describe(self.context) for block in self.blocks],
        }
