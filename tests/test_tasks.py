"""Arithmetic tasks: generated problems, the masked loss, exact-match accuracy per length, the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab import cli, config
from attnlab.config import DataConfig
from attnlab.data.tasks import IGNORE_INDEX, ArithmeticTask, TaskBatches, TaskDataset
from attnlab.errors import ConfigError
from attnlab.eval.metrics.accuracy import accuracy_by_digits, accuracy_table, exact_match, solve, task_metrics
from attnlab.training.trainer import Trainer
from runkit import crash_after_step


def task(**kw) -> ArithmeticTask:
    return ArithmeticTask(DataConfig(source=kw.pop("source", "addition"), **kw))


# ------------------------------------------------------------------ problems


def test_problem_format_and_reversed_answer():
    assert task().problem(123, 45).prompt == "123+45=" and task().problem(123, 45).answer == "168"
    assert task(reverse_answer=True).problem(123, 45).answer == "861"
    sub = task(task="subtraction").problem(45, 123)
    assert (sub.prompt, sub.answer) == ("123-45=", "78")  # operands ordered: answers are never negative
    assert task(source="multiplication").problem(12, 34).answer == "408"
    assert task().problem(7, 1234).digits == 4


def test_rows_mask_the_problem_and_the_padding():
    t = task()
    x, y = t.rows([t.problem(12, 345)], context=14)
    tok = t.tokenizer
    seq = [tok.eos_id] + tok.encode("12+345=357") + [tok.eos_id]
    assert x[0].tolist() == seq[:-1] + [tok.eos_id] * (14 - len(seq) + 1)
    # targets: only the answer digits and the final <eos>
    n_prompt = 1 + len("12+345=")
    assert y[0].tolist() == [IGNORE_INDEX] * (n_prompt - 1) + seq[n_prompt:] + [IGNORE_INDEX] * (14 - len(seq) + 1)


def test_generator_is_deterministic_per_seed_and_never_draws_held_out_problems():
    t = task(digits=2, eval_digits=[1, 2])
    a = t.training_problems(seed=3, step=5, n=64)
    assert a == t.training_problems(seed=3, step=5, n=64)
    assert a != t.training_problems(seed=4, step=5, n=64) and a != t.training_problems(seed=3, step=6, n=64)
    held = {(p.a, p.b) for p in t.held_out()}
    seen = {(p.a, p.b) for s in range(200) for p in t.training_problems(0, s, 64)}
    assert not seen & held
    one_digit = {(a, b) for a in range(10) for b in range(10)}
    assert one_digit - held <= seen  # every other one-digit problem is drawn: only the held-out ones are excluded
    # the held-out set is fixed by data.seed, and another data.seed gives another one
    assert t.held_out() == task(digits=2, eval_digits=[1, 2]).held_out()
    assert t.held_out() != task(digits=2, eval_digits=[1, 2], seed=1).held_out()


def test_held_out_set_per_length():
    t = task(digits=3, eval_problems=50)
    assert t.eval_digits == [1, 2, 3, 4, 5]  # default: two lengths past training
    held = t.held_out()
    by_len = {d: [p for p in held if p.digits == d] for d in t.eval_digits}
    assert [len(v) for v in by_len.values()] == [25, 50, 50, 50, 50]  # 1 digit: a quarter of its 100 problems
    for d, ps in by_len.items():
        assert all(len(str(p.a)) == len(str(p.b)) == d for p in ps)
        assert len({(p.a, p.b) for p in ps}) == len(ps)


def test_batches_resume_from_their_state():
    t = task()
    b = TaskBatches(t, 8, 16, seed=1)
    for _ in range(3):
        b.next_batch()
    state = b.state_dict()
    want = b.next_batch()
    again = TaskBatches(t, 8, 16, seed=1)
    again.load_state_dict(state)
    got = again.next_batch()
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    # ranks take disjoint slices of the same global batch
    r0, r1 = TaskBatches(t, 8, 16, 1, rank=0, world_size=2), TaskBatches(t, 8, 16, 1, rank=1, world_size=2)
    full = TaskBatches(t, 8, 16, 1).next_batch()[0]
    assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), full)


# ------------------------------------------------------------------ the masked loss


def tiny_trainer(tmp_path, *overrides) -> Trainer:
    cfg = config.load(
        None,
        [
            "data.source=addition",
            "data.digits=2",
            "data.eval_digits=1,2,3",
            "model.context=16",
            "model.n_layer=1",
            "model.n_head=2",
            "model.d_model=16",
            "train.batch_size=8",
            "train.max_steps=3",
            "logging.progress=false",
            f"out_dir={tmp_path}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg.validate(), tmp_path / "run")
    trainer.setup()
    return trainer


def masked_loss(logits, y):
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE_INDEX)


def test_masked_positions_contribute_nothing_to_the_loss_or_the_gradient():
    t = task()
    x, y = t.rows(t.training_problems(0, 0, 16), context=16)
    masked = y == IGNORE_INDEX
    logits = torch.randn(*y.shape, t.tokenizer.vocab_size, requires_grad=True)
    loss = masked_loss(logits, y)
    # = the mean NLL of the answer tokens alone
    nll = -logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(loss, nll[~masked].mean())
    # any change of the logits at masked positions (problem tokens, padding) leaves the loss unchanged
    other = logits.detach().clone()
    other[masked] = torch.randn_like(other[masked]) * 10
    assert torch.equal(masked_loss(other, y), loss.detach())
    loss.backward()
    assert torch.count_nonzero(logits.grad[masked]) == 0 and torch.count_nonzero(logits.grad[~masked]) > 0


def test_trainer_step_minimises_the_answer_loss_only(tmp_path, one_thread):
    trainer = tiny_trainer(tmp_path)
    state = trainer.batches.state_dict()
    x, y = trainer.batches.next_batch()
    trainer.batches.load_state_dict(state)
    with torch.no_grad():
        logits = trainer.model(x)
    nll = -logits.float().log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    expected = nll[y != IGNORE_INDEX].mean().item()
    assert trainer.train_step() == pytest.approx(expected, rel=1e-5)
    # the same model and batch with the problem tokens as targets too: another loss, so the mask is what decides
    trainer2 = tiny_trainer(tmp_path / "b")
    unmasked = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
    trainer2.batches.next_batch = lambda: (x, unmasked)
    full = -logits.float().log_softmax(-1).gather(-1, unmasked[..., None])[..., 0].mean().item()
    assert trainer2.train_step() == pytest.approx(full, rel=1e-5) and abs(full - expected) > 1e-3


def test_task_config_errors(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model.context=8 is shorter than the longest addition problem .*"
        r"set model.context=13",
    ):
        tiny_trainer(tmp_path, "model.context=8")
    with pytest.raises(ConfigError, match=r"there are no epochs: use train.max_steps"):
        tiny_trainer(tmp_path, "train.epochs=1")
    with pytest.raises(
        ConfigError,
        match=r"^train.batch_order=sequential walks a token stream, but addition .*"
        r"leave train.batch_order at shuffled$",
    ):
        tiny_trainer(tmp_path, "train.batch_order=sequential")
    with pytest.raises(ConfigError, match=r"must lie in \[1, 18\]"):
        task(digits=19)


# ------------------------------------------------------------------ accuracy


def test_exact_match_and_per_length_split_on_hand_made_answers():
    t = task()
    problems = [t.problem(1, 2), t.problem(3, 4), t.problem(12, 30), t.problem(99, 1), t.problem(100, 200)]
    predictions = ["3", "8", "42", "100", "30"]
    assert exact_match(predictions, [p.answer for p in problems]) == pytest.approx(3 / 5)
    assert accuracy_by_digits(problems, predictions) == {1: 0.5, 2: 1.0, 3: 0.0}


def bump(answer: str) -> str:
    """The answer with its first digit changed: wrong, and as long."""
    return str((int(answer[0]) + 1) % 10) + answer[1:]


class Oracle(torch.nn.Module):
    """A hand-made 'model': reads the problem from its input and writes the right answer, except when `wrong(a, b)`."""

    def __init__(self, t: ArithmeticTask, wrong):
        super().__init__()
        self.t, self.wrong, self.context = t, wrong, 32

    def new_cache(self, batch, max_len):
        return None  # generation recomputes from the whole prefix

    def forward(self, idx, cache=None, last_only=False):
        tok, V = self.t.tokenizer, self.t.tokenizer.vocab_size
        if not last_only:
            return torch.zeros(*idx.shape, V)  # uniform: the loss is ln V per answer token
        out = torch.zeros(idx.size(0), 1, V)
        for i, row in enumerate(idx.tolist()):
            text = tok.decode(row[1:])
            prompt, written = text.split("=")[0] + "=", text.split("=")[1]
            a, b = (int(v) for v in prompt[:-1].split(self.t.symbol))
            answer = self.t.problem(a, b).answer + "<eos>"
            if self.wrong(a, b):
                answer = bump(answer)
            done = "<eos>" in written or answer[len(written) :].startswith("<eos>")  # finished rows get <eos> padding
            nxt = None if done else answer[len(written)]
            out[i, 0, tok.eos_id if nxt is None else tok.encode(nxt)[0]] = 10.0
        return out


def test_accuracy_of_a_hand_made_model_per_length():
    t = task(digits=2, eval_digits=[1, 2, 3], eval_problems=40, reverse_answer=True)
    wrong = lambda a, b: a % 2 == 1  # noqa: E731
    model = Oracle(t, wrong)
    problems = t.held_out()
    assert solve(model, t, problems[:3], device=torch.device("cpu")) == [
        bump(p.answer) if wrong(p.a, p.b) else p.answer for p in problems[:3]
    ]
    m = task_metrics(model, t, device=torch.device("cpu"), batch_size=16)
    for d in (1, 2, 3):
        group = [p for p in problems if p.digits == d]
        assert m[f"accuracy_d{d}"] == pytest.approx(sum(not wrong(p.a, p.b) for p in group) / len(group))
    assert m["accuracy"] == pytest.approx(sum(not wrong(p.a, p.b) for p in problems) / len(problems))
    assert m["loss"] == pytest.approx(math.log(t.tokenizer.vocab_size)) == pytest.approx(m["loss_longer"])
    table = accuracy_table(m, t)
    assert "| 3 (longer than training) | 40 |" in table and table.splitlines()[-1].startswith("| all | 105 |")


# ------------------------------------------------------------------ the CLI on a tiny run


def test_train_eval_sample_an_addition_run(tmp_path, capsys, one_thread):
    run = tmp_path / "add"
    args = [
        "train",
        "data.source=addition",
        "data.digits=2",
        "data.eval_digits=1,2,3",
        "data.eval_problems=20",
        "model.context=16",
        "model.n_layer=1",
        "model.n_head=2",
        "model.d_model=16",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.eval_every=2",
        "logging.progress=false",
        f"out_dir={tmp_path}",
        "name=add",
    ]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"val_loss", "val_accuracy", "val_accuracy_d1", "val_accuracy_d3"} <= set(summary)
    assert not (tmp_path / "data").exists() and not list(run.glob("*.bin"))  # nothing was prepared
    assert cli.main(["eval", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| digits | problems | exact match |" and out[4].startswith("| 3 (longer than training) | 20 |")
    result = json.loads(out[-1])
    assert result["val_accuracy"] == pytest.approx(summary["val_accuracy"])
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert cli.main(["sample", str(run), "--prompt", "12+34"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("12+34=") and (line.endswith(" ok") or line.endswith("wrong (answer 46)"))
    assert cli.main(["sample", str(run), "--num-samples", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5
    assert cli.main(["sample", str(run), "--prompt", "12*34"]) == 2
    assert "is not a addition problem" in capsys.readouterr().err


def test_prepare_of_a_task_says_there_is_nothing_to_prepare(tmp_path, capsys):
    assert cli.main(["prepare", "addition", "--out", str(tmp_path / "d")]) == 3
    assert "generated while training, so there is nothing to prepare" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_sample_lines_of_a_reversed_task():
    from attnlab.eval.generation.task_samples import pick_problems, sample_lines

    t = task(digits=2, eval_digits=[2], reverse_answer=True)
    problems = pick_problems(t, 3, seed=0)
    assert len(problems) == 3 and set(problems) <= set(t.held_out())
    lines = sample_lines(Oracle(t, lambda a, b: a == problems[0].a), t, problems, device=torch.device("cpu"))
    p = problems[0]
    assert lines[0].split() == [
        f"{p.prompt}{bump(p.answer)}",
        "wrong",
        "(answer",
        f"{p.answer}),",
        p.answer[::-1],
        "reversed",
    ]
    assert lines[1].split()[1:] == ["ok,", problems[1].answer[::-1], "reversed"]


def test_task_dataset_is_a_val_stream_of_held_out_problems():
    ds = TaskDataset.from_config(DataConfig(source="addition", digits=1, eval_digits=[1]))
    t = ds.task
    text = t.tokenizer.decode(ds.tokens("val"))
    assert text == "<eos>" + "".join(p.prompt + p.answer + "<eos>" for p in t.held_out())
    assert ds.meta["splits"]["val"]["problems"] == 25 and ds.vocab_size == 16


def test_interrupted_and_resumed_addition_run_equals_uninterrupted(tmp_path, monkeypatch, one_thread):
    from attnlab.training import trainer as trainer_mod
    from attnlab.training.logs import read_events

    def cfg(name):
        return config.load(
            None,
            [
                "data.source=addition",
                "data.digits=2",
                "data.eval_digits=1,3",
                "data.eval_problems=10",
                "model.context=13",
                "model.n_layer=1",
                "model.n_head=2",
                "model.d_model=16",
                "train.batch_size=8",
                "train.max_steps=6",
                "train.checkpoint_every=3",
                "train.eval_every=3",
                "logging.progress=false",
                "logging.log_every=1",
                f"out_dir={tmp_path}",
                f"name={name}",
            ],
        )

    full = trainer_mod.train(cfg("full"))
    crash_after_step(monkeypatch, 4, lambda: trainer_mod.train(cfg("crash")))
    resumed = trainer_mod.train(resume=tmp_path / "crash")
    loss = lambda name: {e["step"]: e["loss"] for e in read_events(tmp_path / name, "training_step")}  # noqa: E731
    assert loss("full") == loss("crash") and len(loss("full")) == 6
    assert resumed["val_loss"] == full["val_loss"] and resumed["val_accuracy"] == full["val_accuracy"]
