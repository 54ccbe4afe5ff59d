"""Arithmetic tasks: exact-match accuracy of greedy answers on the held-out problems, per operand length.

An answer is correct when the model, given ``<eos>`` + the problem (``123+45=``),
greedily writes exactly the answer's digits and then ``<eos>`` (KV-cached
decoding, ``eval/generation/loop.generate``). ``loss`` is the mean NLL (nats)
of the answer tokens, the quantity training minimises, on the held-out problems
of the training lengths.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F

from ...data.tasks import IGNORE_INDEX
from ..generation.filters import SamplingConfig
from ..generation.loop import generate

GREEDY = SamplingConfig(temperature=0.0)


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """The fraction of predictions equal to their answer."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return sum(p == a for p, a in zip(predictions, answers)) / max(1, len(answers))


def accuracy_by_digits(problems, predictions: list[str]) -> dict[int, float]:
    """Exact-match accuracy per operand length (``Problem.digits``), lengths in increasing order."""
    groups: dict[int, list[bool]] = defaultdict(list)
    for p, pred in zip(problems, predictions, strict=True):
        groups[p.digits].append(pred == p.answer)
    return {d: sum(v) / len(v) for d, v in sorted(groups.items())}


@torch.no_grad()
def solve(model, task, problems, *, device, batch_size: int = 256) -> list[str]:
    """The model's greedy answer to each problem (text before its first <eos>), batched by prompt length."""
    tok = task.tokenizer
    out: list[str | None] = [None] * len(problems)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        by_len[len(p.prompt)].append(i)
    for idx in by_len.values():
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo : lo + batch_size]
            prompts = torch.tensor([[tok.eos_id] + tok.encode(problems[i].prompt) for i in chunk], device=device)
            room = model.context - prompts.size(1)  # the answer and its <eos> must fit the context
            n_new = max(1, min(task.answer_length(max(problems[i].digits for i in chunk)) + 1, room))
            ids = generate(model, prompts, n_new, sampling=GREEDY, stop_id=tok.eos_id)[:, prompts.size(1) :]
            for i, row in zip(chunk, ids.tolist()):
                # An answer that never ends gets <unk> appended: it can never match.
                out[i] = tok.decode(row[: row.index(tok.eos_id)] if tok.eos_id in row else row + [tok.unk_id])
    return out


@torch.no_grad()
def answer_loss(model, task, problems, *, device, batch_size: int = 256, autocast_dtype=None) -> float:
    """Mean NLL (nats) over the answer tokens (digits and final <eos>) of `problems`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        for lo in range(0, len(problems), batch_size):
            x, y = task.rows(problems[lo : lo + batch_size], model.context)
            x, y = x.to(device), y.to(device)
            with ctx:
                logits = model(x)
            total += float(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="sum"))
            count += int((y != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / count


def task_metrics(model, task, *, device, batch_size: int = 256, autocast_dtype=None) -> dict:
    """loss, accuracy (all held-out problems) and accuracy_dN per operand length N.

    ``loss`` is over the held-out problems of the training lengths (what early stopping and sweeps compare);
    ``loss_longer`` over the longer ones, where there are any."""
    problems = task.held_out()
    predictions = solve(model, task, problems, device=device, batch_size=batch_size)
    per = accuracy_by_digits(problems, predictions)
    seen = [p for p in problems if p.digits <= task.digits]
    longer = [p for p in problems if p.digits > task.digits]
    loss = lambda ps: answer_loss(
        model,
        task,
        ps,
        device=device,
        batch_size=batch_size,  # noqa: E731
        autocast_dtype=autocast_dtype,
    )
    out = {
        "loss": loss(seen or problems),
        **({"loss_longer": loss(longer)} if seen and longer else {}),
        "accuracy": exact_match(predictions, [p.answer for p in problems]),
        **{f"accuracy_d{d}": acc for d, acc in per.items()},
        "problems": len(problems),
        "partial": False,
    }
    return out


def accuracy_table(metrics: dict, task) -> str:
    """A Markdown table: operand digits, held-out problems, exact-match accuracy (lengths past training marked)."""
    counts = defaultdict(int)
    for p in task.held_out():
        counts[p.digits] += 1
    lines = ["| digits | problems | exact match |", "| ---: | ---: | ---: |"]
    for d in sorted(counts):
        mark = " (longer than training)" if d > task.digits else ""
        lines.append(f"| {d}{mark} | {counts[d]} | {metrics[f'accuracy_d{d}']:.3f} |")
    lines.append(f"| all | {sum(counts.values())} | {metrics['accuracy']:.3f} |")
    return "\n".join(lines)
