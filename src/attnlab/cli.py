"""The ``attnlab`` command. Subcommands only parse arguments and call the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import CheckpointError, ConfigError, Interrupted, UserError

PREPARE_FLAGS = {  # --flag -> data.<key>
    "path": str,
    "format": str,
    "field": str,
    "categories": str,
    "max_docs": int,
    "max_bytes": int,
    "tokenizer": str,
    "vocab_size": int,
    "tokenizer_fit": str,
    "val_frac": float,
    "seed": int,
    "split": str,
    "config": str,
    "tokenizer_file": str,  # hf: sources, existing tokenizer files
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnlab", description="Train, evaluate and sample GPT-style models with pluggable attention."
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="turn a text source into an on-disk token dataset")
    pr.add_argument(
        "source", help="python-stdlib, hn-titles, shakespeare, arxiv-abstracts, hf:NAME, or a local file/folder"
    )
    pr.add_argument("--out", required=True, help="output dataset folder")
    for name, tp in PREPARE_FLAGS.items():
        pr.add_argument("--" + name.replace("_", "-"), dest=name, type=tp)
    pr.add_argument(
        "--export-hf",
        metavar="DIR",
        help="also write each split's documents as a Hugging Face dataset (load_from_disk)",
    )
    pr.add_argument(
        "--tokenizer-from",
        metavar="RUN_DIR",
        help="encode with a run's tokenizer (its dataset's tokenizer.json), e.g. to fine-tune it with train.init_from",
    )
    pr.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    pr.add_argument("overrides", nargs="*", help="more data.key=value settings")

    tr = sub.add_parser("train", help="train a model from a YAML preset plus key=value overrides")
    tr.add_argument("config", nargs="?", help="YAML preset, e.g. configs/quickstart.yaml")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layer=8 optim.lr=3e-4")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest complete checkpoint")
    tr.add_argument("--force", action="store_true", help="replace an existing run directory")
    tr.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume out_dir/name if it has a complete checkpoint, else start it (for torchrun --max-restarts)",
    )

    ev = sub.add_parser("eval", help="bits/byte, nats/token, perplexity over a whole split")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="val")
    ev.add_argument("--context", type=int, help="evaluation window (default: the model's context)")
    ev.add_argument(
        "--stride", type=int, help="sliding-window stride (default: the run's train.eval_stride or the context)"
    )
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--checkpoint", help="a checkpoint folder (default: the latest complete one)")
    ev.add_argument("--device", default="auto")
    ev.add_argument(
        "--data-dir", help="a copy of the run's dataset (default: the run's data.dir); it must match the run's record"
    )
    ev.add_argument(
        "--context-sweep",
        metavar="N,N,...",
        help="text: bits/byte at each window length, also past the "
        "training context where positions extrapolate (RoPE, none); writes CSV + plot into --out",
    )
    ev.add_argument(
        "--mainrun-exact",
        action="store_true",
        help="text: also the Maincode mainrun challenge's own number (its window rule: whole spans of "
        "train.batch_size*model.context+1 tokens; divided by the characters of the whole split)",
    )
    ev.add_argument("--out", help="--context-sweep: folder for context-sweep.csv and context-sweep.png")
    ev.add_argument("--force", action="store_true", help="--context-sweep: write into a non-empty --out folder")

    sa = sub.add_parser("sample", help="generate text from a trained run (KV-cached, batched, streamed)")
    sa.add_argument("run_dir")
    sa.add_argument("--prompt", default="")
    sa.add_argument("--max-new-tokens", type=int, default=200)
    sa.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sa.add_argument("--top-k", type=int)
    sa.add_argument("--top-p", type=float, help="nucleus: keep the smallest set of tokens reaching this mass")
    sa.add_argument("--typical-p", type=float, help="locally typical sampling (Meister et al.)")
    sa.add_argument("--min-p", type=float, help="keep tokens with probability >= min_p * the top probability")
    sa.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="CTRL's penalty on tokens already present (1 = off)"
    )
    sa.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop a sample at this string (repeatable)"
    )
    sa.add_argument("--no-eos-stop", action="store_true", help="continue past the end of a document")
    sa.add_argument("--num-samples", type=int, default=1, help="samples generated together as one batch")
    sa.add_argument("--stream", action="store_true", help="print tokens as they are generated (one sample)")
    sa.add_argument("--no-cache", action="store_true", help="recompute the prefix at every step (slow; for comparison)")
    sa.add_argument("--stats", action="store_true", help="print tokens/s, cache size and peak memory to stderr")
    sa.add_argument(
        "--images", type=int, metavar="N", help="image runs: a grid of N unconditional samples (with --out)"
    )
    sa.add_argument(
        "--complete", type=int, metavar="K", help="image runs: keep the top half of K images and sample the rest"
    )
    sa.add_argument("--split", default=None, help="--complete: the split its images come from (default test, else val)")
    sa.add_argument("--keep-rows", type=int, help="--complete: image rows kept (default half the height)")
    sa.add_argument("--batch-size", type=int, default=16, help="image runs: images generated together")
    sa.add_argument("--out", help="image runs: the PNG to write")
    sa.add_argument("--force", action="store_true", help="replace an existing --out file")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--checkpoint")
    sa.add_argument("--device", default="auto")
    sa.add_argument(
        "--data-dir",
        help="a copy of the run's dataset (default: the run's data.dir); it must match the run's record. "
        "Only --complete needs the dataset: the run keeps its own tokenizer",
    )

    be = sub.add_parser("bench", help="benchmarks")
    bsub = be.add_subparsers(dest="bench", required=True)
    bt = bsub.add_parser("train", help="training tokens/s and peak memory, attnlab vs a plain nanoGPT-style model")
    bt.add_argument("config")
    bt.add_argument("overrides", nargs="*")
    bt.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    bt.add_argument("--warmup", type=int, default=3)
    bt.add_argument("--repeats", type=int, default=5)
    bt.add_argument("--out", help="folder for CSV + PNG + machine.json (default: print only)")
    bt.add_argument("--no-baseline", action="store_true")
    bt.add_argument(
        "--plain-runtime", action="store_true", help="measure attnlab without its CPU allocator setting (models alone)"
    )
    bt.add_argument(
        "--patterns",
        nargs="+",
        metavar="SPEC",
        help="attnlab only, one measurement per pattern (name or name:key=value:...), with dense and an "
        "attention-free step measured alongside for each pattern's Amdahl bound (put overrides before this)",
    )
    ba = bsub.add_parser(
        "attention", help="attention alone: time and peak memory per pattern, backend, length and pass"
    )
    ba.add_argument(
        "--patterns",
        nargs="+",
        required=True,
        metavar="SPEC",
        help="name or name:key=value:..., e.g. dense local:window=256 strided:local_attn_ctx=128:strided_mode=split",
    )
    ba.add_argument("--seq-lens", required=True, help="comma-separated lengths, e.g. 1024,2048,4096")
    ba.add_argument(
        "--backends",
        default="auto",
        help="comma-separated: auto, sdpa_causal, flex or registered backends (default auto)",
    )
    ba.add_argument("--out", required=True, help="results CSV; machine.json, FILE.json and the plot go beside it")
    ba.add_argument("--passes", default="fwd,fwdbwd", help="fwd, fwdbwd or fwd,fwdbwd")
    ba.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported")
    ba.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    ba.add_argument("--batch", type=int, default=1)
    ba.add_argument("--heads", type=int, default=4)
    ba.add_argument("--head-dim", type=int, default=64)
    ba.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ba.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ba.add_argument("--plot", help="log-log plot (default: the CSV path with .png)")
    ba.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="run N competing CPU-spinning processes during the whole benchmark (a loaded machine; default 0)",
    )

    from .bench import generate as bench_generate

    bench_generate.add_parser(bsub)

    vi = sub.add_parser("viz", help="pictures")
    vsub = vi.add_subparsers(dest="viz", required=True)
    vp = vsub.add_parser("pattern", help="draw an attention pattern's mask, one panel per group of identical heads")
    vp.add_argument("--seq-len", type=int, required=True, help="N: the picture is N x N (at most 8192)")
    vp.add_argument("--heads", type=int, default=4, help="number of heads (default 4)")
    vp.add_argument(
        "overrides", nargs="*", help="attention.key=value settings, e.g. attention.pattern=local attention.window=64"
    )
    vp.add_argument("--out", required=True, help="PNG file")
    vp.add_argument(
        "--save-mask",
        metavar="FILE.npy",
        help="also save the boolean mask [heads, N, N] (True = may attend) with numpy.save",
    )
    vp.add_argument("--layer", type=int, default=0, help="layer index (patterns can differ per layer)")
    vp.add_argument("--layers", type=int, default=1, help="number of layers")
    vp.add_argument("--force", action="store_true", help="replace existing --out / --save-mask files")
    vl = vsub.add_parser(
        "logit-lens", help="text runs: each layer's prediction (final norm + unembedding of its residual)"
    )
    vl.add_argument("run_dir")
    vl.add_argument("--text", required=True, help="input text, at most the model's context in tokens")
    vl.add_argument("--out", required=True, help="folder for lens.png, lens.md and lens.csv")
    vl.add_argument("--top-k", type=int, default=5, help="top predictions per cell in the table (default 5)")
    vl.add_argument("--checkpoint", help="a checkpoint folder (default: the latest complete one)")
    vl.add_argument("--device", default="auto")
    vl.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    vl.add_argument(
        "--data-dir", help="a copy of the run's dataset (default: the run's data.dir); it must match the run's record"
    )
    va = vsub.add_parser(
        "attention",
        help="a trained run's attention weights: heat maps per layer (text) or a query pixel's attention over an image",
    )
    va.add_argument("run_dir")
    va.add_argument("--text", help="text runs: the input, at most the model's context in tokens")
    va.add_argument("--image", type=int, metavar="K", help="image runs: image K of --split")
    va.add_argument("--split", default="val", help="--image: the split its image comes from (default val)")
    va.add_argument(
        "--pixel", metavar="ROW,COL[,CHANNEL]", help="--image: the query pixel (default: the centre, last channel)"
    )
    va.add_argument("--layers", help="layers to draw, e.g. 0,2 or 1-3 (default: all)")
    va.add_argument("--heads", help="heads to draw, e.g. 0,1 (default: all)")
    va.add_argument(
        "--out", required=True, help="folder for layerNN.png, weights.npy [layers, heads, T, T] and attention.json"
    )
    va.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    va.add_argument(
        "--data-dir", help="a copy of the run's dataset (default: the run's data.dir); it must match the run's record"
    )
    va.add_argument("--checkpoint", help="a checkpoint folder (default: the latest complete one)")
    va.add_argument("--device", default="auto")
    vs = vsub.add_parser(
        "stats", help="a run's attention statistics (entropy, sink mass, distance, q/k/v norms) against step"
    )
    vs.add_argument("run_dir")
    vs.add_argument("--out", required=True, help="PNG file")
    vs.add_argument("--force", action="store_true", help="replace an existing --out file")

    pa = sub.add_parser("patterns", help="list the registered attention patterns with their parameters")
    pa.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="also list the patterns a plugin file (or module) registers (repeatable)",
    )
    from .bench import gpu_check

    gpu_check.add_parser(sub)

    rp = sub.add_parser(
        "report", help="compare runs: curves, final metrics, seed statistics, patterns, samples (HTML + Markdown)"
    )
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories created by `attnlab train`")
    rp.add_argument("--out", required=True, help="folder for index.html (self-contained), report.md and its PNGs")
    rp.add_argument("--title", help="page title (default: attnlab report: N run(s))")
    rp.add_argument("--force", action="store_true", help="replace the report files in a non-empty --out folder")

    sw = sub.add_parser("sweep", help="train one preset over a grid or random sample of config values, then one report")
    sw.add_argument("sweep_file", help="sweep YAML, e.g. configs/sweeps/patterns.yaml")
    sw.add_argument(
        "choices",
        nargs="*",
        help="with --one (written before SWEEP_FILE): key=value choices of one run, as a wandb agent passes them",
    )
    sw.add_argument("--parallel", type=int, help="runs at once (default: the sweep's parallel, else 1)")
    sw.add_argument(
        "--resume", action="store_true", help="finish an existing sweep folder: skip finished runs, continue the others"
    )
    sw.add_argument("--force", action="store_true", help="replace an existing sweep folder (or --to-wandb file)")
    sw.add_argument("--dry-run", action="store_true", help="print the planned runs (names and overrides) and stop")
    sw.add_argument("--no-report", action="store_true", help="skip the report of the finished runs")
    sw.add_argument(
        "--to-wandb", metavar="FILE", help="write the sweep as a wandb sweep config (for `wandb sweep FILE`) and stop"
    )
    sw.add_argument(
        "--one", action="store_true", help="train one run of the sweep from key=value choices (what wandb agents call)"
    )
    _export_parser(sub)
    return p


def cmd_prepare(a) -> None:
    from .config import Config, parse_override, set_key
    from .data import store

    cfg = Config()
    set_key(cfg, "data.source", a.source)
    try:
        for name in PREPARE_FLAGS:
            if getattr(a, name) is not None:
                set_key(cfg, f"data.{name}", getattr(a, name))
        for arg in a.overrides:
            key, value = parse_override(arg)
            set_key(cfg, key if key.startswith("data.") else f"data.{key}", value)
        if a.tokenizer_from is not None:
            _tokenizer_from(cfg, a)
        meta = store.prepare(cfg.data, a.out, force=a.force, export_hf=a.export_hf)
    except Interrupted:
        raise
    except KeyboardInterrupt:  # the dataset is written in a temporary folder and moved into place at the end
        raise Interrupted(f"{a.out} was not written (nothing was changed)") from None
    except UserError as e:  # speak of the flags the user typed, not of the config keys behind them
        raise type(e)(_as_flags(str(e), [n for n in PREPARE_FLAGS if getattr(a, n) is not None])) from None
    print(
        json.dumps(
            {
                "out": a.out,
                **({"export_hf": a.export_hf} if a.export_hf else {}),
                "vocab_size": meta["vocab_size"],
                **{f"{k}_tokens": v["tokens"] for k, v in meta["splits"].items()},
                **{f"{k}_bytes": v["bytes"] for k, v in meta["splits"].items()},
            }
        )
    )


def _tokenizer_from(cfg, a) -> None:
    """``--tokenizer-from RUN``: data.tokenizer_file is the run's tokenizer.json, data.tokenizer its kind."""
    from .config import set_key
    from .run.finetune import run_tokenizer

    if a.tokenizer_file is not None:
        raise ConfigError("--tokenizer-from and --tokenizer-file both name a tokenizer: pass one of them")
    path, _, kind = run_tokenizer(Path(a.tokenizer_from))
    if a.tokenizer is not None and a.tokenizer != kind:
        raise ConfigError(
            f"--tokenizer {a.tokenizer} differs from {a.tokenizer_from}'s tokenizer ({kind}): drop --tokenizer"
        )
    set_key(cfg, "data.tokenizer", kind)
    set_key(cfg, "data.tokenizer_file", str(path))


def _as_flags(message: str, flags: list[str]) -> str:
    """``data.path='x'`` / ``data.path=x`` -> ``--path 'x'`` / ``--path x`` for the given prepare flags."""
    import re

    for name in flags:
        flag = f"--{name.replace('_', '-')} "
        message = re.sub(rf"\bdata\.{name}(=| )", lambda m, flag=flag: flag, message)
    return message


def cmd_train(a) -> None:
    from pathlib import Path

    from . import config
    from .run.resume import RESUME_OVERRIDES, check_resume_overrides
    from .training.runtime import tune_allocator
    from .training.trainer import train

    args = ([a.config] if a.config is not None else []) + a.overrides  # in any order among the flags
    files, overrides = [x for x in args if "=" not in x], [x for x in args if "=" in x]
    if len(files) > 1:
        raise ConfigError(
            f"attnlab train takes one config file, got {' and '.join(files)}: pass one preset plus key=value overrides"
        )
    cfg = None
    data_dir = None
    extend = []  # stopping-rule overrides that extend the resumed run
    if a.resume is not None:  # data.dir=DIR says where the run's dataset is now (checked against its record)
        data_dir = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "data.dir"), None)
        overrides = [o for o in overrides if o.split("=", 1)[0].strip() != "data.dir"]
        check_resume_overrides(Path(a.resume), overrides)
        extend = [o for o in overrides if o.split("=", 1)[0].strip() in RESUME_OVERRIDES]
        overrides = [o for o in overrides if o not in extend]
    if a.resume is None or files:
        if a.resume is None and not args:
            raise ConfigError(
                "attnlab train needs a config: attnlab train configs/quickstart.yaml (or --resume RUN_DIR)"
            )
        cfg = config.load(files[0] if files else None, overrides)
    run_dir = Path(a.resume) if a.resume is not None else Path(cfg.out_dir) / cfg.name
    tune_allocator()
    try:
        summary = train(
            cfg,
            resume=a.resume,
            force=a.force,
            argv=sys.argv,
            auto_resume=a.auto_resume,
            data_dir=data_dir,
            extend=extend,
        )
    except Interrupted:
        raise
    except KeyboardInterrupt:  # before training started or after it stopped
        raise Interrupted(_train_interrupted(run_dir)) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the summary: print it once
        print(json.dumps(summary))


def _check_device(name: str) -> None:
    import torch

    try:
        torch.device(name if name != "auto" else "cpu")
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None


def _check_counts(a, *flags: str, lo: int = 1) -> None:
    """Refuse --flag values below `lo` (None = not given) instead of replacing them with a default."""
    for flag in flags:
        value = getattr(a, flag)
        if value is not None and value < lo:
            raise UserError(f"--{flag.replace('_', '-')} {value} is not allowed: use a whole number >= {lo}")


def _train_interrupted(run_dir) -> str:
    from .training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest is None:
        return f"no checkpoint of {run_dir} was saved, so there is nothing to resume"
    return f"the latest checkpoint is {latest}: continue with attnlab train --resume {run_dir}"


def cmd_eval(a) -> None:
    from .run.open import load_run

    _check_device(a.device)
    _check_counts(a, "context", "stride", "batch_size")
    run = load_run(a.run_dir, a.checkpoint, a.device, data_dir=a.data_dir)
    if run.dataset.kind == "task":
        return _eval_task(run, a)
    splits = run.dataset.meta["splits"]
    if a.split not in splits:
        raise UserError(f"split {a.split!r} not in {run.dataset.dir}: use one of {', '.join(splits)}")
    out = {"run": str(run.dir), "checkpoint": str(run.checkpoint), "split": a.split}
    out.update(_eval_images(run, a) if run.dataset.kind == "image" else _eval_text(run, a))
    _refuse_non_finite(run, a.split, out)
    print(json.dumps(out))


def _refuse_non_finite(run, split: str, metrics: dict) -> None:
    """Weights that are finite but overflow give a NaN/inf loss: an error, never a number in the output."""
    import math

    bad = next((k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)), None)
    if bad:
        raise CheckpointError(
            f"the loss is not finite on {split} ({bad} = {metrics[bad]}) with checkpoint {run.checkpoint}: "
            f"its weights overflow (the training diverged); use an earlier checkpoint (--checkpoint) "
            f"or retrain with a lower optim.lr"
        )


def _eval_text(run, a) -> dict:
    from .api import evaluate_split

    if a.context_sweep:
        if a.mainrun_exact:
            raise UserError("--mainrun-exact and --context-sweep are separate evaluations: run one at a time")
        return _context_sweep(run, a)
    exact = _mainrun_exact(run, a) if a.mainrun_exact else {}  # first: it refuses a split shorter than a span
    m = evaluate_split(
        run,
        a.split,
        context=a.context,
        stride=a.stride,
        batch_size=a.batch_size,
        progress=True,
        flags=("--context ", "--stride "),
    )
    out = {
        "context": m["context"],
        "stride": m["stride"],
        f"{a.split}_bits_per_byte": m["bits_per_byte"],
        f"{a.split}_nats_per_token": m["nats_per_token"],
        f"{a.split}_perplexity": m["perplexity"],
        f"mainrun_{a.split}_loss": m["mainrun_loss"],
        "tokens_scored": m["tokens"],
        "bytes": m["bytes"],
    }
    return {**out, **exact, **({"tokenizer_fit": m["tokenizer_fit"]} if "tokenizer_fit" in m else {})}


def _mainrun_exact(run, a) -> dict:
    from .api import evaluate_mainrun_exact

    e = evaluate_mainrun_exact(run, a.split, batch_size=a.batch_size, progress=True)
    return {
        f"mainrun_exact_{a.split}_loss": e["loss"],
        f"mainrun_exact_{a.split}_coverage": e["coverage"],
        "mainrun_exact_tokens_scored": e["tokens"],
        "mainrun_exact_rule": (
            f"whole spans of {e['rows']}*{e['context']}+1 tokens (train.batch_size*model.context+1), "
            f"NLL / characters of the whole split with <eos> separators"
        ),
    }


def _context_sweep(run, a) -> dict:
    from .api import check_window
    from .eval.inspection.viz_inputs import check_out_dir
    from .eval.metrics.context_sweep import context_sweep, write_context_sweep

    try:
        contexts = sorted({int(x) for x in a.context_sweep.split(",") if x.strip()})
    except ValueError:
        raise UserError(
            f"--context-sweep {a.context_sweep!r} is not a list of integers: write e.g. 256,512,1024"
        ) from None
    if not contexts or a.context is not None or a.stride is not None or not a.out:
        raise UserError(
            "--context-sweep takes window lengths (e.g. 256,512,1024) and --out DIR, without --context/--stride"
        )
    for n in contexts:
        check_window(run, n, lambda n: f"--context-sweep {n}")
    out = Path(a.out)
    check_out_dir(out, a.force)
    rows = context_sweep(run, a.split, contexts, batch_size=a.batch_size, progress=True)
    files = write_context_sweep(rows, out, f"{run.dir.name}: {a.split} bits/byte against window length")
    return {"context_sweep": rows, **files}


def _eval_task(run, a) -> None:
    """An arithmetic run: the exact-match accuracy table on the held-out problems, then the numbers as JSON."""
    from .eval.metrics.accuracy import accuracy_table, task_metrics

    if a.split != "val" or a.context or a.stride or a.context_sweep or a.mainrun_exact:
        raise UserError(
            f"{run.dir} is an arithmetic run: it is evaluated on its held-out problems "
            "(drop --split/--context/--stride/--context-sweep/--mainrun-exact)"
        )
    m = task_metrics(run.model, run.dataset.task, device=run.device, batch_size=max(a.batch_size, 256))
    print(accuracy_table(m, run.dataset.task))
    print(
        json.dumps(
            {
                "run": str(run.dir),
                "checkpoint": str(run.checkpoint),
                "task": run.dataset.task.describe(),
                **{f"val_{k}": v for k, v in m.items() if k != "partial"},
            }
        )
    )


def _eval_images(run, a) -> dict:
    from .api import evaluate_split

    if a.context is not None or a.stride is not None or a.context_sweep or a.mainrun_exact:
        raise UserError(
            "--context, --stride, --context-sweep and --mainrun-exact apply to text; "
            "an image is always scored whole from its start token"
        )
    m = evaluate_split(run, a.split, batch_size=a.batch_size, progress=True)
    return {
        f"{a.split}_bits_per_dim": m["bits_per_dim"],
        f"{a.split}_nats_per_image": m["nats_per_image"],
        "images_scored": m["images"],
        "dims_per_image": m["dims_per_image"],
    }


def cmd_sample(a) -> None:
    from .eval.generation.filters import SamplingConfig
    from .eval.generation.loop import sample_text
    from .run.open import load_run

    if a.num_samples < 1 or a.max_new_tokens < 0:
        raise UserError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    _check_device(a.device)
    _check_counts(a, "batch_size", "images", "complete")
    if a.stream and a.num_samples > 1:
        raise UserError("--stream prints one sample as it is generated: use --num-samples 1 (or drop --stream)")
    sampling = SamplingConfig(
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        typical_p=a.typical_p,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
    )
    run = load_run(a.run_dir, a.checkpoint, a.device, data_dir=a.data_dir, need_data=False)
    if run.dataset.kind == "task":  # problems and the model's greedy answers
        from .eval.generation.task_samples import pick_problems, sample_lines

        n = 8 if a.num_samples == 1 else a.num_samples  # a handful of problems unless asked for more
        problems = pick_problems(run.dataset.task, n, a.seed, a.prompt)
        print("\n".join(sample_lines(run.model, run.dataset.task, problems, run.device)))
        return
    if run.dataset.kind == "image" or a.images or a.complete:
        return _sample_images(run, a, sampling)
    stream = (lambda text: print(text, end="", flush=True)) if a.stream else None
    if stream:
        stream(a.prompt)
    t0 = time.perf_counter()
    texts, steps = sample_text(
        run.model,
        run.dataset.tokenizer,
        a.prompt,
        a.max_new_tokens,
        num_samples=a.num_samples,
        sampling=sampling,
        seed=a.seed,
        stops=a.stop,
        stop_at_eos=not a.no_eos_stop,
        use_cache=not a.no_cache,
        stream=stream,
        device=run.device,
    )
    if a.stream:
        print()
    else:
        for i, text in enumerate(texts):
            if a.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            print(text)
    if a.stats:
        seconds = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "samples": a.num_samples,
                    "new_tokens": steps,
                    "context": run.cfg.model.context,
                    "cache": not a.no_cache,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(steps * a.num_samples / seconds, 1),
                    "peak_rss_mb": _peak_rss_mb(),
                }
            ),
            file=sys.stderr,
        )


def _sample_images(run, a, sampling) -> None:
    from .data.store import read_images
    from .eval.generation.image_samples import complete_images, sample_images, save_completion_grid, save_grid

    if run.dataset.kind != "image":
        raise UserError(f"{run.dir} models text: --images/--complete are for image runs (drop them to sample text)")
    if bool(a.images) == bool(a.complete) or not a.out:
        raise UserError(
            "an image run samples pictures: pass --images N --out grid.png, or --complete K --out completions.png"
        )
    _check_new_file(a.out, a.force)
    shape = tuple(run.model.cfg.image_shape)
    t0 = time.perf_counter()
    common = dict(sampling=sampling, seed=a.seed, batch_size=a.batch_size, device=run.device, progress=True)
    if a.images:
        path = save_grid(sample_images(run.model, a.images, shape, **common), a.out)
        n = a.images
    else:
        split = a.split or ("test" if "test" in run.dataset.splits else "val")
        originals = read_images(run.dataset, split)[: a.complete]
        completions = complete_images(run.model, originals, keep_rows=a.keep_rows, **common)
        path = save_completion_grid(originals, completions, a.out, keep_rows=a.keep_rows)
        n = len(originals)
    print(
        json.dumps({"out": str(path), "images": n, "shape": list(shape), "seconds": round(time.perf_counter() - t0, 2)})
    )


def _check_new_file(path: str | None, force: bool, flag: str = "--out") -> None:
    """An output file is replaced only with --force (like report and the other viz commands)."""
    if path and os.path.lexists(path) and not force:
        raise UserError(f"{flag} {path} already exists: choose another {flag} or pass --force to replace it")


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory (Linux/macOS), for --stats."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)


def cmd_bench(a) -> None:
    if a.bench == "attention":
        return cmd_bench_attention(a)
    if a.bench == "generate":
        from .bench import generate

        return generate.run(a)
    from . import config
    from .bench import bench_train
    from .training.runtime import pick_device, slow_bf16_warning

    _check_counts(a, "steps", "repeats")
    _check_counts(a, "warmup", lo=0)
    cfg = config.load(a.config, a.overrides)
    if warning := slow_bf16_warning(cfg, pick_device(cfg.train.device)):
        print(warning, file=sys.stderr)
    if a.patterns:
        from .bench.train import bench_train_patterns

        bench_train_patterns(
            cfg, a.patterns, steps=a.steps, warmup=a.warmup, repeats=a.repeats, out=a.out, plain_runtime=a.plain_runtime
        )
        return
    bench_train(
        cfg,
        steps=a.steps,
        warmup=a.warmup,
        repeats=a.repeats,
        out=a.out,
        baseline=not a.no_baseline,
        plain_runtime=a.plain_runtime,
    )


def cmd_bench_attention(a) -> None:
    from .bench.attention import bench_attention, parse_int_list, parse_list
    from .training.runtime import tune_allocator

    if a.device == "cpu":
        tune_allocator()  # as in training, for every backend alike
    bench_attention(
        a.patterns,
        parse_int_list(a.seq_lens, "--seq-lens"),
        parse_list(a.backends),
        parse_list(a.passes),
        repeats=a.repeats,
        batch=a.batch,
        heads=a.heads,
        head_dim=a.head_dim,
        dtype=a.dtype,
        device=a.device,
        out=a.out,
        warmup=a.warmup,
        plot=a.plot,
        busy=a.busy,
    )


def cmd_viz_pattern(a) -> None:
    from .eval.inspection.pattern_viz import draw_pattern, format_params, pattern_from_overrides, save_mask

    pattern = pattern_from_overrides(a.overrides, a.heads, a.layer, a.layers)
    _check_new_file(a.out, a.force)
    _check_new_file(a.save_mask, a.force, "--save-mask")
    fig = draw_pattern(
        pattern, a.seq_len, a.heads, a.out, subtitle=f"layer {a.layer} of {a.layers}" if a.layers > 1 else ""
    )
    if a.save_mask:
        save_mask(pattern, a.seq_len, a.heads, a.save_mask)
    print(
        json.dumps(
            {
                "out": a.out,
                "mask": a.save_mask,
                "pattern": pattern.name,
                "params": format_params(pattern.params()),
                "panels": len(fig.axes),
                "seq_len": a.seq_len,
                "heads": a.heads,
            }
        )
    )


def cmd_viz_logit_lens(a) -> None:
    from .eval.inspection.logit_lens import logit_lens_report
    from .run.open import load_run

    if a.top_k < 1:  # before the run is loaded
        raise UserError(f"--top-k {a.top_k} must be >= 1")
    run = load_run(a.run_dir, a.checkpoint, a.device, data_dir=a.data_dir, need_data=False)
    info = logit_lens_report(run, a.text, a.out, top_k=a.top_k, force=a.force)
    print(json.dumps(info, ensure_ascii=False))


def cmd_viz_attention(a) -> None:
    from .eval.inspection.attention_maps import write_attention_maps
    from .run.open import load_run

    run = load_run(a.run_dir, a.checkpoint, a.device, data_dir=a.data_dir, need_data=False)
    info = write_attention_maps(
        run,
        a.out,
        text=a.text,
        image=a.image,
        split=a.split,
        pixel=a.pixel,
        layers=a.layers,
        heads=a.heads,
        force=a.force,
    )
    print(json.dumps({k: v for k, v in info.items() if k not in ("labels", "token_ids")}, ensure_ascii=False))


def cmd_viz_stats(a) -> None:
    from .eval.inspection.attention_stats import plot_attention_stats

    print(json.dumps(plot_attention_stats(a.run_dir, a.out, force=a.force)))


VIZ = {
    "pattern": cmd_viz_pattern,
    "logit-lens": cmd_viz_logit_lens,
    "attention": cmd_viz_attention,
    "stats": cmd_viz_stats,
}


def cmd_viz(a) -> None:
    VIZ[a.viz](a)


def cmd_report(a) -> None:
    from .eval.report.build import build_report

    page = build_report(a.run_dirs, a.out, title=a.title, force=a.force)
    print(json.dumps({"out": str(page), "markdown": str(page.with_name("report.md")), "runs": len(a.run_dirs)}))


def cmd_sweep(a) -> None:
    from . import sweep as sw

    sweep = sw.load_sweep(a.sweep_file)
    if a.choices and not a.one:
        raise UserError(f"unexpected arguments {' '.join(a.choices)}: key=value choices go with --one (a single run)")
    if a.one:
        from .training.runtime import tune_allocator

        tune_allocator()
        print(json.dumps(sw.run_one(sweep, a.choices)))
    elif a.to_wandb:
        out = sw.write_wandb(sweep, a.to_wandb, force=a.force)
        print(json.dumps({"out": str(out), "method": sweep.method, "parameters": [p.key for p in sweep.parameters]}))
    elif a.dry_run:
        for spec in sw.expand(sweep):
            print(
                json.dumps({"name": spec.name, "run_dir": str(sweep.folder / spec.name), "overrides": spec.overrides})
            )
    else:
        summary = sw.run_sweep(sweep, parallel=a.parallel, resume=a.resume, force=a.force, report=not a.no_report)
        print(json.dumps(summary))
        if summary["failed"]:
            raise sw.SweepRunsFailed(
                f"{summary['failed']} of {summary['runs']} sweep runs did not finish: see their errors in "
                f"{summary['sweep']}/runs.json and logs/, then finish them with --resume"
            )


def _export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a run in another framework's format (hf: a transformers folder)")
    ex.add_argument("run_dir")
    ex.add_argument(
        "--format", required=True, choices=["hf"], help="hf: GPT-2, Llama, Mistral or Qwen3 for transformers"
    )
    ex.add_argument("--out", required=True, help="the folder to write (missing or empty)")
    ex.add_argument("--checkpoint", help="a checkpoint folder (default: the latest complete one)")
    ex.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    ex.add_argument(
        "--data-dir", help="a copy of the run's dataset (only older runs without their own tokenizer copy need it)"
    )


def cmd_export(a) -> None:
    from .export.hf import export_hf

    where = {"data_dir": a.data_dir} if a.data_dir else {}
    print(json.dumps(export_hf(a.run_dir, a.out, checkpoint=a.checkpoint, force=a.force, **where)))


def cmd_patterns(a) -> None:
    from .attention.patterns import listing, load_plugin

    for ref in a.plugin:
        load_plugin(ref)
    print(listing())


def cmd_gpu_check(a) -> None:
    from .bench import gpu_check

    gpu_check.run(a)


COMMANDS = {
    "patterns": cmd_patterns,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "bench": cmd_bench,
    "viz": cmd_viz,
    "report": cmd_report,
    "sweep": cmd_sweep,
    "gpu-check": cmd_gpu_check,
    "export": cmd_export,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line, accepting key=value overrides anywhere among the flags.

    argparse stops filling a positional list at the first flag; what it leaves
    over is added to the command's overrides (argparse's intermixed parsing
    does the same but cannot handle subcommands).
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    target = "overrides" if hasattr(args, "overrides") else "choices" if hasattr(args, "choices") else None
    strays = [x for x in extra if target is None or x.startswith("-")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        setattr(args, target, list(getattr(args, target)) + extra)
    return args


def main(argv: list[str] | None = None) -> int:
    from .openmp import passive_waits

    passive_waits()  # before anything loads torch (building the parser does): see attnlab.openmp
    args = _parse(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"attnlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        if args.command != "sweep":  # a sweep names its own --resume line
            print(f"attnlab: interrupted: {e}" if str(e) else "attnlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
