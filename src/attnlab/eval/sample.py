"""Autoregressive sampling: temperature, top-k and top-p (nucleus).

Generation recomputes the last ``context`` tokens at each step; KV caches
per attention pattern arrive with the generation issue behind this same API.
Randomness comes only from the explicit generator, so a seed reproduces a
sample exactly.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits: [B, V]."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, context: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, stop_id: int | None = None) -> torch.Tensor:
    """Extend ``prompt`` [B, T] by up to ``max_new_tokens`` tokens; returns [B, T + n]."""
    was_training = model.training
    model.eval()
    idx = prompt
    finished = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
        if stop_id is not None:
            nxt = torch.where(finished[:, None], torch.full_like(nxt, stop_id), nxt)
            finished |= nxt[:, 0] == stop_id
        idx = torch.cat([idx, nxt], dim=1)
        if stop_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return idx
