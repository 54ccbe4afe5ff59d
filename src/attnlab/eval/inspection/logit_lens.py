"""Logit lens (nostalgebraist, 2020): what each layer's residual stream would predict.

The model's own read-out — final norm (``model.norm_f``; None for post-norm
models, whose blocks already end in a norm: then identity) and unembedding
(``model.lm_head``) — is applied to the residual stream after the embeddings
(layer 0, the input of block 0) and after every block (layers 1..L). At layer L
this is exactly the model's output. Residuals are caught with forward hooks on
the blocks, so the model code is untouched.

``logit_lens(model, idx)`` is the library call (notebooks);
``logit_lens_report`` is ``attnlab viz logit-lens``: a PNG (rows = layers,
columns = positions, colour = p(true next token), each cell labelled with its
top-1 token), ``lens.md`` and ``lens.csv``.

A text longer than the model's context is refused (not truncated): the lens
would otherwise silently describe a different text than the one given.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import UserError
from .viz_inputs import check_out_dir, encode_text, token_label, token_texts

FILES = ("lens.png", "lens.md", "lens.csv")


@dataclass
class LensResult:
    """Log-probabilities of every layer's read-out: ``log_probs[l, t, v]``, l = 0 (embeddings) .. L (last block).

    ``ids`` [T] is the input; the true next token of position t < T-1 is ``ids[t+1]``.
    """

    log_probs: torch.Tensor  # [L+1, T, vocab], float32, on the CPU
    ids: torch.Tensor  # [T], int64

    @property
    def n_layers(self) -> int:
        """Rows of the lens: the embeddings plus one per block."""
        return self.log_probs.shape[0]

    @property
    def probs(self) -> torch.Tensor:
        return self.log_probs.exp()

    def layer_names(self) -> list[str]:
        return ["embed"] + [f"block {i}" for i in range(1, self.n_layers)]

    def p_next(self) -> torch.Tensor:
        """[L+1, T-1]: probability each layer gives the true next token at positions 0..T-2."""
        nxt = self.ids[1:].view(1, -1, 1).expand(self.n_layers, -1, 1)
        return self.log_probs[:, :-1].gather(2, nxt).squeeze(2).exp()

    def top_k(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, ids), each [L+1, T, k], most likely first."""
        values, ids = self.log_probs.topk(k, dim=-1)
        return values.exp(), ids


def logit_lens(model: torch.nn.Module, idx: torch.Tensor) -> LensResult:
    """The logit lens of a GPT on one sequence ``idx`` ([T] or [1, T] token ids).

    Runs one forward pass in eval mode without gradients (the model's train/eval
    mode is restored) and returns log-probabilities [L+1, T, vocab] on the CPU.
    Memory: (L+1)·T·vocab floats, so meant for short texts.
    """
    if idx.dim() == 2 and idx.shape[0] == 1:
        idx = idx[0]
    if idx.dim() != 1 or idx.numel() == 0:
        raise UserError(f"logit_lens takes one non-empty sequence of ids, shape [T] or [1, T]; got {list(idx.shape)}")
    device = next(model.parameters()).device
    residuals: list[torch.Tensor] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda _m, args: residuals.append(args[0]))]
    hooks += [b.register_forward_hook(lambda _m, _args, out: residuals.append(out)) for b in model.blocks]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(idx.view(1, -1).to(device))
            log_probs = torch.stack([read_out(model, x[0]) for x in residuals]).cpu()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return LensResult(log_probs, idx.detach().cpu().long())


def read_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's final norm (identity when it has none) and unembedding, as float32 log-probabilities."""
    if model.norm_f is not None:
        x = model.norm_f(x)
    return F.log_softmax(model.lm_head(x).float(), dim=-1)


# ---------------------------------------------------------------- labels and table


def lens_rows(result: LensResult, tokenizer, k: int) -> list[dict]:
    """One row per (position, layer): ids, token texts, top-k with probabilities, p(true next); ordered by position."""
    vocab = result.log_probs.shape[-1]
    if not 1 <= k <= vocab:
        raise UserError(f"--top-k {k} is outside [1, {vocab}] (the vocabulary): pick a smaller k")
    top_p, top_ids = result.top_k(k)
    p_next = result.p_next()
    ids = result.ids.tolist()
    names = result.layer_names()
    seen = sorted(set(ids) | set(top_ids.unique().tolist()))
    text = dict(zip(seen, token_texts(tokenizer, seen)))  # decode each distinct id once
    rows = []
    for t, tok in enumerate(ids):
        nxt = ids[t + 1] if t + 1 < len(ids) else None
        for layer in range(result.n_layers):
            tops = top_ids[layer, t].tolist()
            rows.append(
                {
                    "layer": layer,
                    "layer_name": names[layer],
                    "position": t,
                    "input_id": tok,
                    "input": text[tok],
                    "next_id": nxt,
                    "next": None if nxt is None else text[nxt],
                    "p_next": None if nxt is None else float(p_next[layer, t]),
                    "top": [(i, text[i], float(p)) for i, p in zip(tops, top_p[layer, t].tolist())],
                }
            )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Machine-readable table: raw token texts (csv-quoted) and ids; p_next empty at the last position."""
    k = len(rows[0]["top"])
    fields = ["layer", "layer_name", "position", "input_id", "input", "next_id", "next", "p_next"]
    fields += [f"{name}{j}" for j in range(1, k + 1) for name in ("top_id", "top", "p_top")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            flat = {key: ("" if r[key] is None else r[key]) for key in fields[:8]}
            for j, (i, text, p) in enumerate(r["top"], 1):
                flat.update({f"top_id{j}": i, f"top{j}": text, f"p_top{j}": f"{p:.6g}"})
            if r["p_next"] is not None:
                flat["p_next"] = f"{r['p_next']:.6g}"
            w.writerow(flat)


def _md(text: str) -> str:
    """A token label inside a Markdown table cell (code span; pipes escaped)."""
    return "`" + token_label(text, 24).replace("|", "\\|").replace("`", "'") + "`"


def write_markdown(rows: list[dict], path: Path, title: str) -> None:
    k = len(rows[0]["top"])
    lines = [
        f"# Logit lens: {title}",
        "",
        "Rows by position, then layer (embed = the embeddings, block i = the output of block i). "
        "Tokens are shown with spaces as ␣.",
        "",
        f"| layer | pos | input | true next | p(true next) | top-{k} (p) |",
        "| --- | ---: | --- | --- | ---: | --- |",
    ]
    for r in rows:
        p = "—" if r["p_next"] is None else f"{r['p_next']:.3f}"
        nxt = "—" if r["next"] is None else _md(r["next"])
        tops = ", ".join(f"{_md(text)} {q:.3f}" for _, text, q in r["top"])
        lines.append(f"| {r['layer_name']} | {r['position']} | {_md(r['input'])} | {nxt} | {p} | {tops} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- picture


def draw_lens(result: LensResult, tokenizer, path: Path, title: str = "") -> None:
    """Rows = layers (embed at the bottom), columns = positions labelled with the input tokens,
    colour = p(true next token) (grey at the last position, which has none), text = top-1 token."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to select

    L1, T = result.n_layers, result.ids.numel()
    grid = np.full((L1, T), np.nan)
    grid[:, :-1] = result.p_next().numpy()
    top1 = result.log_probs.argmax(-1)
    ids = sorted(set(top1.unique().tolist()) | set(result.ids.tolist()))
    label = dict(zip(ids, (token_label(s) for s in token_texts(tokenizer, ids))))
    fig = Figure(figsize=(1.6 + 0.62 * T, 1.4 + 0.42 * L1), dpi=100)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")  # the last position has no true next token
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, origin="lower", aspect="auto", interpolation="nearest")
    for layer in range(L1):
        for t in range(T):
            dark = np.isnan(grid[layer, t]) or grid[layer, t] > 0.6
            ax.text(
                t,
                layer,
                label[int(top1[layer, t])],
                ha="center",
                va="center",
                fontsize=8,
                color="black" if dark else "white",
            )
    inputs = [label[i] for i in result.ids.tolist()]
    ax.set_xticks(range(T), inputs, rotation=90 if max(map(len, inputs)) > 2 else 0, fontsize=8)
    ax.set_yticks(range(L1), result.layer_names(), fontsize=8)
    ax.set_xlabel("input token (position)")
    ax.set_title(title or "logit lens: colour = p(true next token), text = top-1 prediction", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="p(true next)")
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------- command


def _encode_text(run, text: str) -> torch.Tensor:
    if run.dataset.kind != "text":
        raise UserError(f"{run.dir} is an image run: the logit lens is for text runs (pass a run trained on text)")
    return encode_text(run, text)


def logit_lens_report(run, text: str, out: str | Path, *, top_k: int = 5, force: bool = False) -> dict:
    """``attnlab viz logit-lens`` for a loaded run (``runs.load_run``): write lens.png, lens.md and lens.csv
    into ``out``; returns what was written."""
    out = Path(out)
    check_out_dir(out, force)
    if top_k < 1:
        raise UserError(f"--top-k {top_k} must be >= 1")
    ids = _encode_text(run, text)
    result = logit_lens(run.model, ids)
    tok = run.dataset.tokenizer
    rows = lens_rows(result, tok, top_k)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name.split(".")[1]: out / name for name in FILES}
    title = f"{run.dir.resolve().name} @ {Path(run.checkpoint).name}"
    draw_lens(result, tok, paths["png"], title=f"logit lens, {title}: colour = p(true next), text = top-1")
    write_markdown(rows, paths["md"], title)
    write_csv(rows, paths["csv"])
    final = result.p_next()[-1]
    return {
        "out": str(out),
        **{k: str(v) for k, v in paths.items()},
        "checkpoint": str(run.checkpoint),
        "tokens": int(ids.numel()),
        "layers": result.n_layers,
        "top_k": top_k,
        "final_mean_p_next": round(final.mean().item(), 6) if final.numel() else None,
    }  # None: one token
