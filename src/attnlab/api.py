"""The Python API: open a trained run and use it, or train one.

    import attnlab
    run = attnlab.load("runs/nb")
    run.generate("def ", 100, temperature=0.7, top_k=40)   # what `attnlab sample` prints
    run.evaluate(split="val")                               # what `attnlab eval` prints
    run.logits("def f():")                                  # [T, vocab]
    attnlab.train("configs/quickstart.yaml", name="nb", **{"train.max_steps": 50})

Every method is a thin layer over the functions the command line calls
(``runs.load_run``, ``sample_text``, ``score_tokens`` / ``score_images``), so
the numbers and samples are the command line's exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from .errors import ConfigError, UserError
from .eval.generation.filters import SamplingConfig
from .eval.generation.loop import sample_text
from .eval.metrics.scoring import (
    image_metrics,
    mainrun_exact_metrics,
    mainrun_windows,
    score_images,
    score_tokens,
    score_windows,
    text_metrics,
)
from .run.open import LoadedRun, load_run
from .training.python_api import train  # noqa: F401  (attnlab.api.train: the Python API's train)

SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
SAMPLE_DEFAULTS = {"temperature": 0.8}  # `attnlab sample`'s defaults where they differ from SamplingConfig's


# ------------------------------------------------------------------ evaluation: what `attnlab eval` computes


def check_window(run: LoadedRun, n: int, name: Callable[[int], str]) -> None:
    """An evaluation window: at least 1 token, and past the training context only where positions extrapolate
    (``name(n)`` spells the setting in messages: ``--context 64`` or ``context=64``)."""
    trained = run.cfg.model.context
    if n < 1:
        raise UserError(f"{name(n)} must be >= 1 (tokens per evaluation window)")
    refusal = run.model.extrapolation_refusal() if n > trained else None
    if refusal:
        raise UserError(f"{name(n)} exceeds the training context {trained} and {refusal}: use a window <= {trained}")


def eval_window(
    run: LoadedRun,
    context: int | None = None,
    stride: int | None = None,
    *,
    flags: tuple[str, str] = ("context=", "stride="),
) -> tuple[int, int]:
    """The evaluation window and stride: the model's context and the run's train.eval_stride unless given. A window
    longer than the training context is allowed where the model's positions extrapolate. ``flags`` name the two
    settings in messages (the CLI's ``--context `` and ``--stride ``)."""
    context = run.cfg.model.context if context is None else context
    check_window(run, context, lambda n: f"{flags[0]}{n}")
    stride = min(run.cfg.train.eval_stride or context, context) if stride is None else stride
    if not 1 <= stride <= context:
        raise UserError(f"{flags[1]}{stride} is outside [1, {context}]: use a stride no larger than the context")
    return context, stride


def evaluate_split(
    run: LoadedRun,
    split: str = "val",
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    flags: tuple[str, str] = ("context=", "stride="),
) -> dict:
    """Every token (text) or image of a split scored once, with `attnlab eval`'s defaults: the numbers it prints."""
    run.dataset.split_info(split)  # a DataError naming the splits there are
    if run.dataset.kind == "image":
        if context is not None or stride is not None:
            raise UserError("context and stride apply to text; an image is always scored whole from its start token")
        return _image_split(run, split, batch_size, progress)
    context, stride = eval_window(run, context, stride, flags=flags)
    with run.model.longer_windows(context):
        score = score_tokens(
            run.model,
            run.dataset.tokens(split),
            context=context,
            stride=stride,
            batch_size=batch_size,
            device=run.device,
            progress=progress,
        )
    return {
        "split": split,
        "context": context,
        "stride": stride,
        **text_metrics(score, run.dataset.meta["splits"][split]),
        **tokenizer_label(run),
    }


def evaluate_mainrun_exact(run: LoadedRun, split: str = "val", *, batch_size: int = 32, progress: bool = False) -> dict:
    """The Maincode "mainrun" challenge's own number: only whole spans of train.batch_size * model.context + 1
    tokens scored (rows of model.context), the summed NLL divided by the characters of the whole split with
    its ``<eos>`` separators. ``coverage``: the share of the split's targets those spans score."""
    info = run.dataset.split_info(split)
    if run.dataset.kind != "text":
        raise UserError(f"--mainrun-exact scores text; {run.dataset.dir} holds {run.dataset.kind}s: drop it")
    rows, context = run.cfg.train.batch_size, run.cfg.model.context
    windows = mainrun_windows(info["tokens"], context, rows)
    if not windows:
        raise UserError(
            f"the {split} split has {info['tokens'] - 1} tokens, fewer than one span of train.batch_size*model.context+1"
            f" = {rows}*{context}+1, so the challenge's rule scores nothing: use a larger split (data.val_frac)"
        )
    score = score_windows(
        run.model, run.dataset.tokens(split), windows, batch_size=batch_size, device=run.device, progress=progress
    )
    return {"split": split, "rows": rows, "context": context, **mainrun_exact_metrics(score, info)}


def tokenizer_label(run: LoadedRun) -> dict:
    """A label on the numbers of a dataset whose tokenizer was fit on its validation documents too."""
    fit = (run.dataset.meta.get("data_config") or {}).get("tokenizer_fit", "train")
    return {"tokenizer_fit": f"{fit} (the tokenizer saw the validation text)"} if fit != "train" else {}


def _image_split(run: LoadedRun, split: str, batch_size: int, progress: bool) -> dict:
    from .data.image_format import SOS

    n = run.cfg.model.context
    score = score_images(
        run.model,
        run.dataset.tokens(split),
        tokens_per_image=n,
        sos=SOS,
        batch_size=batch_size,
        device=run.device,
        progress=progress,
    )
    return {"split": split, **image_metrics(score, n), "dims_per_image": n}


def evaluate_text(
    run: LoadedRun,
    text: str | Sequence[str],
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 32,
) -> dict:
    """The metrics of documents given as text, laid out as a prepared split is: ``<eos> doc <eos> doc <eos>``.

    A split holding exactly these documents gets the same numbers from ``evaluate_split``.
    """
    tokenizer = _text_tokenizer(run, "evaluate(text=...)")
    docs = [text] if isinstance(text, str) else list(text)
    if not docs or not all(isinstance(d, str) and d for d in docs):
        raise UserError("evaluate(text=...) takes a non-empty string or a list of non-empty strings")
    ids = [tokenizer.eos_id]
    for doc_ids in tokenizer.encode_batch(docs):
        ids += [*doc_ids, tokenizer.eos_id]
    context, stride = eval_window(run, context, stride)
    score = score_tokens(
        run.model,
        np.asarray(ids, dtype=np.int64),
        context=context,
        stride=stride,
        batch_size=batch_size,
        device=run.device,
    )
    meta = {
        "bytes": sum(len(d.encode("utf-8")) for d in docs),
        "chars": sum(len(d) for d in docs),
        "documents": len(docs),
    }
    return {"documents": len(docs), "context": context, "stride": stride, **text_metrics(score, meta)}


def _text_tokenizer(run: LoadedRun, what: str):
    if run.dataset.kind == "image" or run.dataset.tokenizer is None:
        raise UserError(
            f"{run.dir} models images: {what} is for text runs (use evaluate(split=...) or attnlab.eval.sample_images)"
        )
    return run.dataset.tokenizer


# ------------------------------------------------------------------ a loaded run


class Run:
    """A trained run opened for use: ``model``, ``tokenizer``, ``config`` and the methods below."""

    def __init__(self, loaded: LoadedRun):
        self.loaded = loaded

    @property
    def dir(self) -> Path:
        return self.loaded.dir

    @property
    def config(self) -> config_mod.Config:
        return self.loaded.cfg

    @property
    def model(self):
        """The ``attnlab.model.GPT`` in eval mode on ``device``: ``model(ids [B, T]) -> logits [B, T, vocab]``."""
        return self.loaded.model

    @property
    def tokenizer(self):
        """The run's tokenizer (``encode``, ``decode``, ``eos_id``, ``vocab_size``); None for image runs."""
        return self.loaded.dataset.tokenizer

    @property
    def dataset(self):
        return self.loaded.dataset

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def checkpoint(self) -> Path:
        return self.loaded.checkpoint

    def generate(
        self,
        prompt: str = "",
        max_new_tokens: int = 200,
        *,
        seed: int = 0,
        num_samples: int = 1,
        stop: str | Sequence[str] = (),
        stop_at_eos: bool = True,
        use_cache: bool = True,
        **sampling: Any,
    ) -> str | list[str]:
        """The prompt and its continuation, as `attnlab sample` prints it (a list of ``num_samples`` texts if > 1).

        ``sampling``: temperature (default 0.8, 0 = greedy), top_k, top_p, typical_p, min_p, repetition_penalty.
        """
        tokenizer = _text_tokenizer(self.loaded, "generate")
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise ConfigError(
                f"generate() got an unknown sampling setting {unknown[0]!r}: use {', '.join(SAMPLING_KEYS)}"
            )
        if num_samples < 1 or max_new_tokens < 0:
            raise UserError("generate() needs num_samples >= 1 and max_new_tokens >= 0")
        texts, _ = sample_text(
            self.model,
            tokenizer,
            prompt,
            max_new_tokens,
            num_samples=num_samples,
            sampling=SamplingConfig(**{**SAMPLE_DEFAULTS, **sampling}),
            seed=seed,
            stops=[stop] if isinstance(stop, str) else list(stop),
            stop_at_eos=stop_at_eos,
            use_cache=use_cache,
            device=self.device,
        )
        return texts[0] if num_samples == 1 else texts

    def evaluate(
        self,
        split: str | None = None,
        *,
        text: str | Sequence[str] | None = None,
        context: int | None = None,
        stride: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> dict:
        """Bits per byte (text) or per dimension (images), nats per token, perplexity, over a whole split
        (default ``val``: the numbers `attnlab eval` prints) or over ``text`` (a string or a list of documents)."""
        if text is not None:
            if split is not None:
                raise UserError("evaluate() takes a split or text=..., not both")
            return evaluate_text(self.loaded, text, context=context, stride=stride, batch_size=batch_size)
        return evaluate_split(
            self.loaded, split or "val", context=context, stride=stride, batch_size=batch_size, progress=progress
        )

    def evaluate_mainrun_exact(self, split: str = "val", *, batch_size: int = 32, progress: bool = False) -> dict:
        """The Maincode mainrun challenge's own number (``attnlab eval --mainrun-exact``): ``loss``,
        ``coverage`` (the share of the split's tokens its window rule scores), ``tokens``."""
        return evaluate_mainrun_exact(self.loaded, split, batch_size=batch_size, progress=progress)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` read as a document: ``<eos>`` (a document's start, as in training), then the text."""
        tokenizer = _text_tokenizer(self.loaded, "encode")
        return [tokenizer.eos_id, *tokenizer.encode(text)]

    @torch.no_grad()
    def logits(self, text: str | Sequence[int]) -> torch.Tensor:
        """Next-token logits [T, vocab] (float32, on ``device``): row t predicts token t + 1.

        A string is read as a document (``encode``: ``<eos>`` first, so row 0 predicts its first token);
        a list of ids is fed as given.
        """
        ids = self.encode(text) if isinstance(text, str) else [int(i) for i in text]
        if not 1 <= len(ids) <= self.model.context:
            raise UserError(
                f"logits() got {len(ids)} tokens: the model reads 1 to {self.model.context} "
                "(its context); shorten the text"
            )
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x)[0].float()

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, checkpoint={self.checkpoint.name!r}, device={str(self.device)!r})"


def load(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "auto", **options: Any) -> Run:
    """Open a run directory from its latest complete checkpoint (or ``checkpoint``) on ``device``.

    Generating needs only the run directory (its own tokenizer copy); evaluating a split needs the run's
    dataset, found where the run recorded it or at ``data_dir=DIR``."""
    options.setdefault("need_data", False)
    options.setdefault("hint", "attnlab.load(RUN, data_dir=DIR)")
    return Run(load_run(run_dir, checkpoint, device, **options))
