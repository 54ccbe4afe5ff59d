"""``attnlab sample`` for an arithmetic run: problems and the model's greedy answers, one per line."""

from __future__ import annotations

import re

import numpy as np

from ...errors import UserError
from ..metrics.accuracy import solve

PROBLEM = re.compile(r"^\s*(\d+)\s*([-+*])\s*(\d+)\s*=?\s*$")


def pick_problems(task, n: int, seed: int, prompt: str = ""):
    """The problem written in ``prompt`` (``123+45`` or ``123+45=``), else ``n`` held-out problems drawn with ``seed``."""
    if prompt:
        m = PROBLEM.match(prompt)
        if not m or m.group(2) != task.symbol:
            raise UserError(
                f"--prompt {prompt!r} is not a {task.name} problem: write it as A{task.symbol}B, e.g. 123{task.symbol}45"
            )
        return [task.problem(int(m.group(1)), int(m.group(3)))]
    held = task.held_out()
    order = np.random.default_rng(seed).permutation(len(held))[:n]
    return sorted((held[i] for i in order), key=lambda p: (p.digits, held.index(p)))


def sample_lines(model, task, problems, device) -> list[str]:
    """``123+45=168   ok`` or ``123+45=169   wrong (answer 168)``; reversed answers as the model writes them
    (``123+45=861   ok, 168 reversed``)."""
    answers = solve(model, task, problems, device=device)
    width = max(len(p.prompt) + max(len(a), len(p.answer)) for p, a in zip(problems, answers)) + 3
    lines = []
    for p, a in zip(problems, answers):
        verdict = "ok" if a == p.answer else f"wrong (answer {p.answer})"
        if task.reverse:  # the answer as a number, for reading
            verdict += f", {p.answer[::-1]} reversed"
        lines.append(f"{p.prompt}{a}".ljust(width) + verdict)
    return lines
