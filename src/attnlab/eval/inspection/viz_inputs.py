"""What the `attnlab viz` commands on a trained run share: a text encoded for the run, visible token labels,
and the output folder check."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import UserError

LABEL_CHARS = 8  # longest token label drawn in a picture cell or on an axis (longer ones end in "…")


def encode_text(run, text: str) -> torch.Tensor:
    """``--text`` as the run's token ids [T], refusing empty text and text longer than the model's context."""
    ids = run.dataset.tokenizer.encode(text)
    if not ids:
        raise UserError('--text is empty: pass some text, e.g. --text "the model"')
    context = run.cfg.model.context
    if len(ids) > context:
        raise UserError(
            f"--text is {len(ids)} tokens, longer than the model's context of {context}: "
            f"shorten it to at most {context} tokens"
        )
    return torch.tensor(ids, dtype=torch.long)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded alone; a lone byte that is not valid UTF-8 is written as its value (\\xNN) for byte tokenizers."""
    texts = []
    for i in ids:
        text = tokenizer.decode([i])
        if "\ufffd" in text and tokenizer.kind == "bytes":
            text = f"\\x{i:02x}"
        texts.append(text)
    return texts


def token_label(text: str, limit: int = LABEL_CHARS) -> str:
    """A token's text made visible and short: spaces as '␣', control characters escaped, at most ``limit`` chars."""
    out = "".join(
        "␣" if c == " " else c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return out if len(out) <= limit else out[: limit - 1] + "…"


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder without ``--force`` (which writes into it, replacing only same-named files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"--out {out} already exists and is not empty: choose another --out or pass --force to write into it"
        )
