"""Arithmetic tasks: ``addition`` (and ``subtraction``, ``multiplication``), generated on the fly.

A problem is written ``<eos>123+45=168<eos>`` in a fixed character vocabulary
(``data.reverse_answer``: ``...=861<eos>``, least significant digit first). The
model learns the answer only: the loss targets of the problem tokens, and of the
padding after the final ``<eos>``, are ``IGNORE_INDEX``, which
``F.cross_entropy`` skips.

Training problems come from a generator seeded by (``train.seed``, step), so a
batch depends only on the seed and the step (resumable from one int, nothing
written to disk); each operand has 1..``data.digits`` digits. The held-out set
comes from ``data.seed``: ``data.eval_problems`` distinct problems per operand
length in ``data.eval_digits`` (both operands with exactly that many digits;
lengths above ``data.digits`` measure length generalisation). Training never
draws a held-out problem.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .text import CharTokenizer

TASK_SOURCES = ("addition", "subtraction", "multiplication")
OPS = {"addition": ("+", operator.add), "subtraction": ("-", operator.sub), "multiplication": ("*", operator.mul)}
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
MAX_DIGITS = 18  # operands stay within int64 for numpy's generator
VOCAB = sorted("0123456789+-*=")  # one vocabulary for every task: runs can be compared and fine-tuned across tasks


def is_task(cfg: DataConfig) -> bool:
    return cfg.source in TASK_SOURCES


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    digits: int  # the longer operand's number of digits
    prompt: str  # "123+45="
    answer: str  # "168" as the model writes it (reversed with data.reverse_answer)


class ArithmeticTask:
    def __init__(self, cfg: DataConfig):
        self.name = cfg.task or cfg.source
        self.symbol, self._fn = OPS[self.name]
        self.digits, self.reverse, self.seed = cfg.digits, cfg.reverse_answer, cfg.seed
        self.eval_digits = sorted(set(cfg.eval_digits)) if cfg.eval_digits else list(range(1, cfg.digits + 3))
        self.eval_problems = cfg.eval_problems
        bad = [d for d in [self.digits, *self.eval_digits] if not 1 <= d <= MAX_DIGITS]
        if bad:
            raise ConfigError(
                f"data.digits / data.eval_digits must lie in [1, {MAX_DIGITS}], got {bad[0]}: choose shorter operands"
            )
        self.tokenizer = CharTokenizer(VOCAB)
        self._held_out: list[Problem] | None = None

    # ------------------------------------------------------------ problems
    def problem(self, a: int, b: int) -> Problem:
        if self.name == "subtraction" and a < b:
            a, b = b, a  # answers stay non-negative
        answer = str(self._fn(a, b))
        return Problem(
            a, b, max(len(str(a)), len(str(b))), f"{a}{self.symbol}{b}=", answer[::-1] if self.reverse else answer
        )

    def answer_length(self, digits: int) -> int:
        """The longest answer for operands of at most `digits` digits."""
        return 2 * digits if self.name == "multiplication" else digits + (self.name == "addition")

    def sequence_length(self, digits: int) -> int:
        """Model inputs of the longest problem: <eos> a op b = answer (its final <eos> is only a target)."""
        return 1 + 2 * digits + 2 + self.answer_length(digits)

    @property
    def context_needed(self) -> int:
        return self.sequence_length(max(self.digits, *self.eval_digits))

    def held_out(self) -> list[Problem]:
        """The fixed validation problems (``data.seed``), ordered by length then draw."""
        if self._held_out is None:
            out = []
            for d in self.eval_digits:
                rng = np.random.default_rng([self.seed, 1, d])
                count = 10 if d == 1 else 9 * 10 ** (d - 1)
                want = min(self.eval_problems, count * count // 4)  # leave most small problems to training
                seen: dict[tuple[int, int], Problem] = {}
                while len(seen) < want:
                    a, b = (_draw(rng, np.full(want, d)) for _ in range(2))
                    for x, y in zip(a.tolist(), b.tolist()):
                        p = self.problem(x, y)
                        if len(seen) < want:
                            seen.setdefault((p.a, p.b), p)
                out += seen.values()
            self._held_out = out
        return self._held_out

    def training_problems(self, seed: int, step: int, n: int) -> list[Problem]:
        """Batch `step`'s `n` problems: operand lengths uniform in 1..digits, never a held-out problem."""
        held = {(p.a, p.b) for p in self.held_out()}
        rng = np.random.default_rng([seed, 0, step])
        out: list[Problem] = []
        while len(out) < n:
            m = n - len(out)
            a = _draw(rng, rng.integers(1, self.digits + 1, m))
            b = _draw(rng, rng.integers(1, self.digits + 1, m))
            out += [p for p in map(self.problem, a.tolist(), b.tolist()) if (p.a, p.b) not in held]
        return out

    # ------------------------------------------------------------ tokens
    def encode(self, p: Problem) -> tuple[list[int], int]:
        """The ids of <eos> prompt answer <eos>, and how many of them (from the start) belong to the problem."""
        tok = self.tokenizer
        prompt = [tok.eos_id] + tok.encode(p.prompt)
        return prompt + tok.encode(p.answer) + [tok.eos_id], len(prompt)

    def rows(self, problems: list[Problem], context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) [n, context]: x padded with <eos>, y = next tokens with the problem and padding masked."""
        x = torch.full((len(problems), context), self.tokenizer.eos_id, dtype=torch.long)
        y = torch.full((len(problems), context), IGNORE_INDEX, dtype=torch.long)
        for i, p in enumerate(problems):
            ids, n_prompt = self.encode(p)
            if len(ids) - 1 > context:
                raise ConfigError(
                    f"model.context={context} is shorter than the problem {p.prompt}{p.answer} "
                    f"({len(ids) - 1} tokens): set model.context={self.context_needed}"
                )
            x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
            y[i, n_prompt - 1 : len(ids) - 1] = torch.tensor(ids[n_prompt:])  # the answer digits and the final <eos>
        return x, y

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": "arithmetic",
            "digits": self.digits,
            "eval_digits": self.eval_digits,
            "eval_problems": self.eval_problems,
            "reverse_answer": self.reverse,
            "seed": self.seed,
        }


def _draw(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    """One number per entry with exactly that many digits (1 digit: 0..9)."""
    lo = np.where(digits == 1, 0, 10 ** (digits - 1).astype(np.int64))
    return rng.integers(lo, 10 ** digits.astype(np.int64))


# ------------------------------------------------------------ batches


class TaskBatches:
    """Generated training batches with the BatchIterator interface: the cursor is the step."""

    def __init__(
        self, task: ArithmeticTask, batch_size: int, context: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} is not divisible by the {world_size} data-parallel processes: "
                f"use a multiple of {world_size}"
            )
        self.task, self.batch_size, self.context, self.seed = task, batch_size, context, seed
        self.rank, self.local_batch = rank, batch_size // world_size
        self.step = 0
        self.steps_per_epoch = 1  # problems never repeat in order: "epochs" do not apply (refused in check_config)
        self.epoch_float = 0.0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        problems = self.task.training_problems(self.seed, self.step, self.batch_size)  # the global batch
        self.step += 1
        lo = self.rank * self.local_batch
        return self.task.rows(problems[lo : lo + self.local_batch], self.context)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "context": self.context}

    def load_state_dict(self, d: dict) -> None:
        for key in ("seed", "batch_size", "context"):
            if int(d.get(key, getattr(self, key))) != getattr(self, key):
                raise DataError(
                    f"the saved batch position is for {key}={d[key]}, but this run has {key}={getattr(self, key)}: "
                    "resume with the same train.batch_size, model.context and train.seed"
                )
        self.step = int(d["step"])


# ------------------------------------------------------------ the dataset stand-in


@dataclass
class TaskDataset:
    """What the trainer and ``load_run`` need of a dataset, for a generated task: nothing on disk."""

    task: ArithmeticTask
    dir: Path
    meta: dict = field(default_factory=dict)
    kind = "task"

    @classmethod
    def from_config(cls, cfg: DataConfig) -> TaskDataset:
        task = ArithmeticTask(cfg)
        tok = task.tokenizer
        meta = {
            "kind": "task",
            "source": task.describe(),
            "vocab_size": tok.vocab_size,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
            "splits": {"val": {"problems": len(task.held_out()), "tokens": len(_stream(task))}},
        }
        return cls(task, Path(f"generated:{task.name}"), meta)

    @property
    def tokenizer(self) -> CharTokenizer:
        return self.task.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def tokens(self, split: str) -> np.ndarray:
        """The held-out problems as one <eos>-separated stream (what attention statistics read)."""
        if split != "val":
            raise DataError(
                f"the generated {self.task.name} task has only a 'val' split (held-out problems): use --split val"
            )
        return _stream(self.task)


def _stream(task: ArithmeticTask) -> np.ndarray:
    ids = [task.tokenizer.eos_id]
    for p in task.held_out():
        ids += task.encode(p)[0][1:]
    return np.asarray(ids, dtype=np.uint16)


def check_config(cfg) -> None:
    """Training rules of a generated task; ConfigError naming the key."""
    t = cfg.train
    if t.epochs is not None or t.evals_per_epoch is not None:
        raise ConfigError(
            f"{cfg.data.source} problems are generated without end, so there are no epochs: "
            "use train.max_steps and train.eval_every instead of train.epochs / train.evals_per_epoch"
        )
    if t.batch_order != "shuffled":
        raise ConfigError(
            f"train.batch_order={t.batch_order} walks a token stream, but {cfg.data.source} problems are "
            "generated afresh for every batch: leave train.batch_order at shuffled"
        )
    need = ArithmeticTask(cfg.data).context_needed
    if cfg.model.context < need:
        raise ConfigError(
            f"model.context={cfg.model.context} is shorter than the longest {cfg.data.source} problem "
            f"with its answer ({need} tokens): set model.context={need}"
        )
