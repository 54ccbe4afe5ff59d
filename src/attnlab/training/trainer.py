"""The training loop: data -> model -> optimizer steps, evaluation, checkpoints, logs.

``train(cfg)`` starts a run in ``out_dir/name``; ``train(cfg, resume=run_dir)``
continues one from its latest complete checkpoint, reproducing exactly what
an uninterrupted run would have done (same batches, RNG streams, schedule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import config as config_mod
from .. import folders, jsonout
from ..attention.backends import attention_dropout
from ..config import Config
from ..data import store, tasks
from ..data.batches import BatchIterator, ImageBatches
from ..data.image_format import SOS
from ..errors import CheckpointError, DataError, Interrupted, TrainingDiverged, UserError
from ..eval.inspection.attention_stats import attention_stats_event
from ..eval.metrics.curves import plot_curves
from ..eval.metrics.scoring import Score, image_metrics, score_images, score_tokens, text_metrics
from ..model.gpt import GPT
from ..run import extend as extend_mod
from ..run import finetune, identity
from ..run.open import RESUME_DATA_HINT, fit_model_to_data, open_dataset, open_run_dataset
from ..run.plugins import copy_plugins
from ..run.resume import auto_resume_target, check_resume_config
from . import checkpoint as ckpt
from . import distributed, flops, runtime
from .logs import EventLog, check_loggers, validation_line
from .memory import check_fits
from .optim import UNPLANNED, RunClock, build_optimizer, build_scheduler

# ------------------------------------------------------------------ state kept across resumes


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_val: float = math.inf
    evals_without_improvement: int = 0
    last_loss: float = math.nan

    def state(self) -> dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------ the trainer

step_timer = time.perf_counter  # times each step (train_seconds, the budget); tests replace it with a fake clock


def _built_in_setup():
    """A Trainer attribute that ``setup()`` assigns: not an __init__ argument, left out of repr and ==."""
    return field(init=False, repr=False, compare=False)


@dataclass
class Trainer:
    cfg: Config
    run_dir: Path
    argv: list[str] = field(default_factory=list)
    dist: distributed.Dist = field(default_factory=distributed.Dist)  # this process's rank under torchrun
    data_dir: str | Path | None = None  # resume: a copy of the run's dataset to use instead of its data.dir
    resuming: bool = False  # the run directory exists: its dataset is the one it recorded

    # Built by setup(), from the config and the dataset; everything else reads these.
    device: torch.device = _built_in_setup()
    amp_dtype: torch.dtype | None = _built_in_setup()  # None: plain float32
    ds: store.Dataset = _built_in_setup()
    image: bool = _built_in_setup()  # an image dataset (bytes after SOS)
    task: tasks.ArithmeticTask | None = _built_in_setup()  # a generated task (no train.bin)
    train_tokens: np.ndarray = _built_in_setup()  # memmaps of the splits
    val_tokens: np.ndarray = _built_in_setup()
    batches: BatchIterator = _built_in_setup()  # ImageBatches for images
    model: GPT = _built_in_setup()  # the unwrapped model (checkpoints, eval)
    parallel: torch.nn.Module = _built_in_setup()  # model, DDP around it, or FSDP2-sharded
    forward: Callable[[torch.Tensor], torch.Tensor] = _built_in_setup()  # parallel, maybe compiled
    optimizer: torch.optim.Optimizer = _built_in_setup()
    steps_per_epoch: int = _built_in_setup()
    total_steps: int = _built_in_setup()
    scheduler: torch.optim.lr_scheduler.LambdaLR = _built_in_setup()
    clock: RunClock = _built_in_setup()  # what the lr schedule follows
    scaler: torch.amp.GradScaler | None = _built_in_setup()  # float16 autocast only
    eval_every: int | None = _built_in_setup()
    progress: Progress = _built_in_setup()  # what a checkpoint restores
    saved_step: int | None = _built_in_setup()  # the step of the last checkpoint written
    init_from: dict | None = _built_in_setup()  # train.init_from: the checkpoint the weights came from

    def setup(self) -> None:
        cfg, rank, world = self.cfg, self.dist.rank, self.dist.world_size
        check_loggers(cfg)
        distributed.check_config(cfg, self.dist)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = distributed.init(self.dist, runtime.pick_device(cfg.train.device))
        self.amp_dtype = runtime.pick_dtype(cfg.train.dtype, self.device)
        runtime.seed_everything(cfg.train.seed)
        with distributed.main_first(self.dist):  # one rank prepares the dataset on disk
            progress = cfg.logging.progress and self.dist.is_main
            if not self.resuming:
                self.ds = open_dataset(cfg.data, progress=progress)
            else:  # resuming: the run's own dataset, checked against its record
                self.ds = open_run_dataset(
                    self.run_dir,
                    cfg.data,
                    data_dir=self.data_dir,
                    rebuild=True,
                    hint=RESUME_DATA_HINT,
                    progress=progress,
                )
        vocab, model_cfg = fit_model_to_data(cfg, self.ds)
        self.image = self.ds.kind == "image"
        self.task = self.ds.task if self.ds.kind == "task" else None
        self.train_tokens = None if self.task else self.ds.tokens("train")
        self.val_tokens = self.ds.tokens("val")
        if len(self.val_tokens) < 2:
            raise DataError(f"{self.ds.dir} has an empty validation split: raise data.val_frac")
        if self.task:  # generated problems with a masked loss (data/tasks.py)
            tasks.check_config(cfg)
            self.batches = tasks.TaskBatches(
                self.task, cfg.train.batch_size, cfg.model.context, cfg.train.seed, rank=rank, world_size=world
            )
        else:
            kind = functools.partial(ImageBatches, sos=SOS) if self.image else BatchIterator
            self.batches = kind(
                self.train_tokens,
                cfg.train.batch_size,
                cfg.model.context,
                cfg.train.seed,
                rank=rank,
                world_size=world,
                order=cfg.train.batch_order,
            )
        check_fits(cfg, vocab, self.device, training=True, model_cfg=model_cfg)  # before allocating anything large
        self.model = GPT(model_cfg, cfg.attention, vocab).to(self.device)
        self.init_from = None
        if cfg.train.init_from and not self.resuming:  # weights only: the optimizer and schedule start fresh
            self.init_from = finetune.init_weights(self.model, cfg.train.init_from, self.ds)
        self.model.resolve_backends(self.device)
        if self.dist.is_main and (warning := runtime.slow_bf16_warning(cfg, self.device)):
            print(warning, file=sys.stderr)
        # MFU in training_step events where a peak is known (every rank counts): a GPU's bf16 data-sheet peak,
        # or on a CPU this process's measured matmul rate in the run's autocast dtype (its own key).
        peak, self.mfu_key = flops.device_peak_tflops(self.device), "mfu"
        if peak is None and self.device.type == "cpu":
            peak = flops.measured_cpu_peak_tflops(torch.get_num_threads(), self.amp_dtype or torch.float32)
            self.mfu_key = flops.CPU_MFU_KEY
        self.peak_tflops = peak * self.dist.world_size if peak else None
        self.flops_per_token = flops.flops_per_token(self.model, cfg.model.context) if peak else None
        # DDP wraps the model; FSDP2 shards it in place (so the optimizer is built after this).
        self.parallel = distributed.wrap(self.model, self.dist, cfg.train.parallel, self.device)
        self.forward = torch.compile(self.parallel) if cfg.train.compile else self.parallel
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.steps_per_epoch = max(1, self.batches.steps_per_epoch // cfg.train.grad_accum)
        self.total_steps = self._total_steps()
        self.progress = Progress()
        self.clock = RunClock(
            self.total_steps if self.total_steps < UNPLANNED else None,
            cfg.train.time_budget_s,
            lambda: self.progress.train_seconds,
        )
        after = (
            extend_mod.continuation(self.run_dir) if self.resuming else None
        )  # an extended run's re-planned schedule
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps, self.clock, after)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.eval_every = self._eval_every()
        self.saved_step = None

    def _total_steps(self) -> int:
        t = self.cfg.train
        candidates = []
        if t.max_steps is not None:
            candidates.append(t.max_steps)
        if t.epochs is not None:
            candidates.append(max(1, math.ceil(t.epochs * self.batches.steps_per_epoch / t.grad_accum)))
        return min(candidates) if candidates else UNPLANNED  # a budget alone: the schedule follows the clock

    def _eval_every(self) -> int | None:
        t = self.cfg.train
        if t.eval_every is not None:
            return t.eval_every
        if t.evals_per_epoch is not None:
            return max(1, self.steps_per_epoch // t.evals_per_epoch)
        return None

    # ---------------------------------------------------------- logging

    def log_start(self, log: EventLog, resumed: bool) -> None:
        cfg = self.cfg
        if resumed:
            log.log("run_resumed", step=self.progress.step, argv=self.argv, world_size=self.dist.world_size)
            return
        log.log("hyperparameters_configured", config=config_mod.to_dict(cfg), argv=self.argv)
        log.log(
            "device_info",
            **runtime.device_info(self.device),
            autocast_dtype=str(self.amp_dtype) if self.amp_dtype else "float32",
            mfu_peak_tflops=self.peak_tflops,  # what MFU divides by (None: no MFU), and where it comes from
            mfu_peak=self._mfu_peak_source() if self.peak_tflops else None,
        )
        log.log(
            "dataset_info",
            dir=str(self.ds.dir),
            vocab_size=self.ds.vocab_size,
            tokenizer=self.ds.meta["tokenizer"],
            splits=self.ds.meta["splits"],
            source=self.ds.meta.get("source"),
        )
        # The model as built: its config completed from the dataset (image shape), which config.yaml leaves as given.
        log.log(
            "model_configured", model=dataclasses.asdict(self.model.cfg), attention=config_mod.to_dict(cfg)["attention"]
        )
        log.log(
            "model_info",
            **self.model.describe(),
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.clock.total_steps,
            schedule_follows=self.clock.follows,
        )

    def meta_text(self) -> str:
        meta = {
            "versions": runtime.versions(),
            "git_sha": runtime.git_sha(),
            "git_dirty": runtime.git_dirty(),
            **runtime.device_info(self.device),
            "seed": self.cfg.train.seed,
            "argv": self.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self.cfg.train.init_from:
            meta["init_from"] = self.init_from
        if self.dist.enabled:
            meta["distributed"] = {"world_size": self.dist.world_size, "parallel": self.cfg.train.parallel}
        return json.dumps(meta, indent=2)

    # ---------------------------------------------------------- checkpoints

    def save(self, log: EventLog) -> Path:
        if self.saved_step == self.progress.step:
            return ckpt.latest_checkpoint(self.run_dir)
        weights, optimizer = distributed.full_state(self.model, self.optimizer)  # FSDP: every rank gathers
        self._check_finite(log, weights, optimizer)
        if self.dist.is_main:  # the full state, in the single-process format (any rank count can resume it)
            state = {
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.rng_state(self.device),
                "data": self.batches.state_dict(),
                "step": self.progress.step,
                "trainer": self.progress.state(),
            }
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            path = ckpt.save_checkpoint(self.run_dir, self.progress.step, self.model, state, weights)
            ckpt.prune_checkpoints(self.run_dir, keep=2)
            log.log("checkpoint_saved", step=self.progress.step, path=str(path))
        distributed.barrier(self.dist)  # no rank goes on before the checkpoint is complete
        self.saved_step = self.progress.step
        return ckpt.latest_checkpoint(self.run_dir)

    def _check_finite(self, log: EventLog, weights: dict | None, optimizer: dict) -> None:
        """Stop like a diverged loss if weights or optimizer state hold NaN/inf: such a checkpoint is never saved."""
        bad = None
        if self.dist.is_main:
            bad = ckpt.first_non_finite(weights or self.model.state_dict()) or ckpt.first_non_finite(
                optimizer, "optimizer"
            )
        if self.dist.enabled:  # every rank stops, not only the one that looked
            bad = bad or ("a tensor" if distributed.all_reduce_sum(self.dist, [float(bad is not None)])[0] else None)
        if bad:
            self._diverged(log, self.progress.last_loss, tensor=bad)

    def restore(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise CheckpointError(
                f"{self.run_dir} has no complete checkpoint to resume from: start a new run "
                f"(attnlab train {self.run_dir}/config.yaml name=...)"
            )
        if distributed.is_fsdp(self.model):
            weights, state = ckpt.load_checkpoint(path)
            ckpt.check_matches(path, weights, self.model)
            distributed.load_full_state(self.model, self.optimizer, weights, state["optimizer"])
        else:
            _, state = ckpt.load_checkpoint(path, self.model)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["trainer"])
        self.saved_step = self.progress.step
        ckpt.set_rng_state(state["rng"])

    # ---------------------------------------------------------- steps

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> float:
        t = self.cfg.train
        distributed.reseed_for_step(self.dist, t.seed, self.progress.step)
        total = torch.zeros((), device=self.device)
        for i in range(t.grad_accum):
            x, y = self.batches.next_batch()  # this rank's rows of the global batch
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Ranks average their gradients once, after the last micro-step: the global mean loss's gradient.
            with distributed.grad_sync(self.parallel, sync=i == t.grad_accum - 1):
                with self.autocast():
                    logits = self.forward(x)
                    # Targets equal to IGNORE_INDEX (a task's problem tokens and padding) contribute nothing.
                    loss = (
                        F.cross_entropy(
                            logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=tasks.IGNORE_INDEX
                        )
                        / t.grad_accum
                    )
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip > 0:  # the global norm: DDP grads are reduced, FSDP's are sharded DTensors
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item()

    def evaluate(self, split: str = "val", full: bool = True, progress: bool = False) -> dict:
        """The split's metrics; ``full=False`` may score only ``train.val_tokens`` (then ``partial`` is True)."""
        t, context = self.cfg.train, self.cfg.model.context
        if self.task:
            from ..eval.metrics.accuracy import task_metrics

            return task_metrics(
                self.model, self.task, device=self.device, batch_size=t.eval_batch_size, autocast_dtype=self.amp_dtype
            )
        tokens = self.ds.tokens(split)
        limit = None if full else t.val_tokens
        run = dict(
            batch_size=t.eval_batch_size,
            device=self.device,
            autocast_dtype=self.amp_dtype,
            progress=progress and self.dist.is_main,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        if self.image:
            n_images = len(tokens) // context
            max_images = None if limit is None else max(1, limit // context)
            score = self._reduce(
                score_images(self.model, tokens, tokens_per_image=context, sos=SOS, max_images=max_images, **run)
            )
            return {
                **image_metrics(score, context),
                "loss": score.nll_nats / score.tokens,
                "partial": score.tokens < n_images * context,
            }
        partial = limit is not None and limit < len(tokens) - 1
        score = self._reduce(
            score_tokens(self.model, tokens, context=context, stride=t.eval_stride, max_tokens=limit, **run)
        )
        return {
            **text_metrics(score, self.ds.meta["splits"][split], partial=partial),
            "loss": score.nll_nats / score.tokens,
            "partial": partial,
        }

    def _reduce(self, score: Score) -> Score:
        """Each rank scored its share of the split: sum the shares (float64)."""
        if not self.dist.enabled:
            return score
        nll, tokens = distributed.all_reduce_sum(self.dist, [score.nll_nats, score.tokens])
        return Score(nll, int(tokens))

    def should_stop(self) -> str | None:
        t, p = self.cfg.train, self.progress
        if p.step >= self.total_steps:
            return "max_steps" if t.max_steps is not None and p.step >= t.max_steps else "epochs"
        if t.epochs is not None and self.batches.epoch_float >= t.epochs:
            return "epochs"
        if t.time_budget_s is not None and p.train_seconds >= t.time_budget_s:
            return "time_budget"
        if t.early_stopping_patience is not None and p.evals_without_improvement >= t.early_stopping_patience:
            return "early_stopping"
        return None

    def periodic_eval(self, log: EventLog) -> None:
        m = self.evaluate(full=False)
        p = self.progress
        self._log_eval(log, m, epoch=self.batches.epoch_float)
        self.log_attention_stats(log)
        self.write_samples(log)
        if m["loss"] < p.best_val:
            p.best_val, p.evals_without_improvement = m["loss"], 0
        else:
            p.evals_without_improvement += 1

    def fit(self, log: EventLog) -> str:
        cfg, p = self.cfg, self.progress
        bar = tqdm(
            total=self.total_steps if self.total_steps < UNPLANNED else None,
            initial=p.step,
            disable=not (cfg.logging.progress and self.dist.is_main),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.context
        reason = self.should_stop()
        with _deferred_interrupts() as interrupted:
            while reason is None:
                t0 = step_timer()
                loss = self.train_step()
                # Ranks agree on the loss (global mean), step time and interrupts, so they stop together.
                loss, dt, stop_now = distributed.agree(self.dist, loss, step_timer() - t0, interrupted())
                if not math.isfinite(loss):
                    self._diverged(log, loss)
                p.step += 1
                p.tokens += tokens_per_step
                p.train_seconds += dt
                self.scheduler.step()  # after the step's seconds are counted: a budget schedule reads them
                p.last_loss = loss
                lr = self.scheduler.get_last_lr()[0]
                if p.step % cfg.logging.log_every == 0 or p.step == 1:
                    log.log(
                        "training_step",
                        step=p.step,
                        loss=loss,
                        lr=lr,
                        tokens_per_second=tokens_per_step / dt,
                        epoch=self.batches.epoch_float,
                        tokens=p.tokens,
                        **self._mfu(tokens_per_step / dt),
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
                if self.eval_every and p.step % self.eval_every == 0:
                    self.periodic_eval(log)
                reason = self.should_stop()
                if reason is None and cfg.train.checkpoint_every and p.step % cfg.train.checkpoint_every == 0:
                    self.save(log)
                if stop_now:  # only between steps, so the saved state is consistent
                    bar.close()
                    path = self.save(log)
                    log.log("training_interrupted", step=p.step, checkpoint=str(path))
                    raise Interrupted(f"checkpoint {path} saved: continue with attnlab train --resume {self.run_dir}")
        bar.close()
        return reason

    def _mfu_peak_source(self) -> str:
        if self.mfu_key != flops.CPU_MFU_KEY:
            return "bf16 data sheet"
        return f"measured {'bf16' if self.amp_dtype == torch.bfloat16 else 'fp32'} matmul"

    def _mfu(self, tokens_per_second: float) -> dict:
        """{"mfu": fraction of the bf16 peak} on a GPU whose peak is known, {"mfu_cpu_measured_peak": ...}
        on a CPU, else {} (see training.flops)."""
        if self.flops_per_token is None:
            return {}
        return {self.mfu_key: round(flops.mfu(self.flops_per_token, tokens_per_second, self.peak_tflops), 5)}

    def _diverged(self, log: EventLog, loss: float, tensor: str | None = None) -> None:
        """The loss (or, with ``tensor``, a weight or optimizer tensor after a step) became NaN/inf."""
        step = self.progress.step + (0 if tensor else 1)
        last = ckpt.latest_checkpoint(self.run_dir)
        log.log("training_diverged", step=step, loss=loss, tensor=tensor, last_checkpoint=str(last) if last else None)
        kept = f"kept the last good checkpoint {last}" if last else "no checkpoint was saved yet"
        what = (
            f"weights are not finite at step {step} ({tensor}; {kept})"
            if tensor
            else f"loss became {loss} at step {step} ({kept})"
        )
        raise TrainingDiverged(
            f"{what}: lower optim.lr, enable optim.grad_clip or use train.dtype=float32, then start a new run"
        )

    def _split_summary(self, split: str, m: dict) -> dict:
        if self.task:
            return {f"{split}_{k}": v for k, v in m.items() if k != "partial"}
        if self.image:
            return {
                f"{split}_bits_per_dim": m["bits_per_dim"],
                f"{split}_nats_per_image": m["nats_per_image"],
                f"{split}_images_scored": m["images"],
            }
        out = {f"{split}_bits_per_byte": m["bits_per_byte"], f"{split}_nats_per_token": m["nats_per_token"]}
        if split == "val":
            out.update(
                val_perplexity=m["perplexity"], mainrun_val_loss=m["mainrun_loss"], val_tokens_scored=m["tokens"]
            )
        return out

    def write_samples(self, log: EventLog) -> None:
        """A grid of ``logging.sample_images`` images or ``logging.sample_tokens`` of text into samples/."""
        lg, step = self.cfg.logging, self.progress.step
        n = lg.sample_images if self.image else lg.sample_tokens
        path = self.run_dir / "samples" / f"step-{step:07d}{'.png' if self.image else '.txt'}"
        if not n or self._exists(path):  # the final evaluation may fall on a periodic one's step
            return
        if self.dist.is_main:
            path.parent.mkdir(exist_ok=True)
        seed = self.cfg.train.seed + step  # its own generator: the training RNG streams are untouched
        if self.image:
            from ..eval.generation.image_samples import sample_images, save_grid

            grid = sample_images(
                self.model, n, tuple(self.model.cfg.image_shape), seed=seed, device=self.device, progress=False
            )
            if self.dist.is_main:
                save_grid(grid, path)
        else:
            from ..eval.generation.loop import sample_text

            (text,), _ = sample_text(
                self.model, self.ds.tokenizer, "", n, seed=seed, device=self.device, stop_at_eos=False
            )
            if self.dist.is_main:
                ckpt.atomic_write_text(path, text)
        log.log("samples_written", step=step, path=str(path))

    def _exists(self, path: Path) -> bool:
        """Rank 0's answer for every rank (a rank must not skip work the others do)."""
        exists = path.exists() if self.dist.is_main else False
        return bool(distributed.all_reduce_sum(self.dist, [float(exists)])[0]) if self.dist.enabled else exists

    def log_attention_stats(self, log: EventLog, **extra) -> None:
        """One ``attention_stats`` event on ``logging.attention_stats`` validation sequences (0 = none)."""
        n = self.cfg.logging.attention_stats
        if n:
            fields = attention_stats_event(
                self.model,
                self.val_tokens,
                n,
                context=self.cfg.model.context,
                image=self.image,
                device=self.device,
                autocast_dtype=self.amp_dtype,
            )
            log.log("attention_stats", step=self.progress.step, **fields, **extra)

    def _log_eval(self, log: EventLog, m: dict, **extra) -> None:
        p = self.progress  # tokens and train_seconds let a report plot against tokens and wall-clock
        log.log(
            "validation_step",
            step=p.step,
            tokens=p.tokens,
            train_seconds=p.train_seconds,
            val_loss=m["loss"],
            partial=m["partial"],
            **{f"val_{k}": v for k, v in m.items() if k not in ("loss", "partial")},
            **extra,
        )
        if self.dist.is_main and self.cfg.logging.progress:  # one line per result, above the progress bar
            tqdm.write(validation_line(p.step, m), file=sys.stderr)

    def finish(self, log: EventLog, reason: str, wall_start: float) -> dict:
        p, final_start = self.progress, time.time()
        self.save(log)
        planned = self.clock.total_steps
        if reason == "time_budget" and planned is not None and p.step < planned and self.dist.is_main:
            print(
                f"attnlab: warning: train.time_budget_s={self.cfg.train.time_budget_s:g} ended the run at step {p.step} "
                f"of {planned} planned (the lr schedule followed the budget and is annealed); a faster or quieter "
                f"machine trains further",
                file=sys.stderr,
            )
        log.log("training_finished", step=p.step, reason=reason)
        val = self.evaluate("val", full=True, progress=self.cfg.logging.progress)
        self._log_eval(log, val, final=True)
        self.log_attention_stats(log, final=True)
        summary = {
            **self._split_summary("val", val),
            "tokens_per_second": p.tokens / p.train_seconds if p.train_seconds else 0.0,
            "peak_memory_mb": runtime.peak_memory_mb(self.device),
            "params": self.model.num_params(),
            "steps": p.step,
            "epochs": self.batches.epoch_float,
            "train_tokens": p.tokens,
            "final_train_loss": p.last_loss,
            "stop_reason": reason,
            "schedule_follows": self.clock.follows,
            "planned_steps": self.clock.total_steps,
            "final_lr": self.scheduler.get_last_lr()[0],
            "train_seconds": p.train_seconds,
            "attention": self.model.describe()["attention"],  # each layer's pattern and the backend that ran it
            "attn_dropout": attention_dropout(self.cfg.model),
        }
        if self.cfg.train.init_from:
            summary["init_from"] = self.cfg.train.init_from
        if not self.image:
            summary.update(
                eval_context=self.cfg.model.context, eval_stride=self.cfg.train.eval_stride or self.cfg.model.context
            )
        if "test" in self.ds.meta["splits"]:
            summary.update(self._split_summary("test", self.evaluate("test", full=True)))
        self.write_samples(log)
        if self.dist.is_main:
            log.log("plot_written", path=str(plot_curves(self.run_dir, self.image)))
        now = time.time()  # the whole command, final evaluation, samples and plot included
        summary.update(final_seconds=now - final_start, wall_seconds=now - wall_start)
        summary = jsonout.finite(summary, {"final_train_loss": "no training step ran"})
        if self.dist.is_main:
            ckpt.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        log.log("summary", **summary)
        return summary


@contextlib.contextmanager
def _deferred_interrupts():
    """Turn Ctrl-C / SIGTERM into a flag the loop checks between steps."""
    hit = []

    def handler(signum, frame):
        hit.append(signum)

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        old = {}
    try:
        yield lambda: bool(hit)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(
    cfg: Config | None = None,
    *,
    resume: str | Path | None = None,
    force: bool = False,
    argv: list[str] | None = None,
    auto_resume: bool = False,
    data_dir: str | Path | None = None,
    extend: list[str] | None = None,
) -> dict:
    """Run (or resume) training and return summary.json's content.

    Under torchrun every rank calls this (each returns the summary); rank 0
    alone writes the run directory, holding its lock from before the first
    check to the end. ``auto_resume`` continues out_dir/name from its newest
    complete checkpoint if it has one, else starts it, so that
    ``torchrun --max-restarts`` can re-run the same command after a failure.
    ``data_dir`` (resume) points at a copy of the run's dataset; it must match the run's record.
    ``extend`` (resume): stopping-rule overrides such as ``["train.max_steps=2000"]`` that extend the run
    (``run/extend.py``).
    """
    wall_start = time.time()
    if auto_resume and (resume is not None or force or cfg is None):
        raise UserError(
            "--auto-resume takes a config and picks start or resume itself: "
            "drop --resume/--force (or drop --auto-resume)"
        )
    if extend and resume is None:
        raise UserError("extending a run needs --resume RUN_DIR: train.max_steps=N extends the run it resumes")
    if resume is None:
        cfg.validate()
        run_dir = Path(cfg.out_dir) / cfg.name
    else:
        run_dir = Path(resume)
        folders.check_run_dir(run_dir)
        if data_dir is None and cfg is not None and cfg.data.dir:  # the config's data.dir points at the data
            data_dir = cfg.data.dir
    dist = distributed.from_env()
    made = dist.is_main and resume is None and _make_out_dir(run_dir.parent)  # it holds the lock file
    try:
        with folders.locked(run_dir) if dist.is_main else contextlib.nullcontext():
            return _train_locked(
                cfg, run_dir, resume is not None, force, auto_resume, argv or [], dist, wall_start, data_dir, extend
            )
    finally:
        if made:  # refused before the run existed: leave no empty out_dir behind
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()


def _make_out_dir(out_dir: Path) -> bool:
    """Create out_dir if needed; whether it was created."""
    if out_dir.is_dir():
        return False
    try:
        out_dir.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as e:
        raise folders.cannot_write(out_dir, e, "choose a writable out_dir") from None
    return True


def _train_locked(
    cfg: Config | None,
    run_dir: Path,
    resume: bool,
    force: bool,
    auto_resume: bool,
    argv: list[str],
    dist: distributed.Dist,
    wall_start: float,
    data_dir: str | Path | None,
    extend: list[str] | None = None,
) -> dict:
    if auto_resume:
        target, force = auto_resume_target(cfg)
        resume = target is not None
    if resume:
        cfg = saved = check_resume_config(run_dir, cfg)
        if extend:
            cfg = extend_mod.extended_config(saved, extend)
        if dist.is_main:
            for d in (run_dir, run_dir / "checkpoints"):
                if d.is_dir():
                    folders.check_writable(
                        d, "make the run directory writable, or copy it somewhere writable and resume the copy"
                    )
    elif dist.is_main:
        folders.check_target(
            run_dir, "run", force, "choose another name (name=...)", f", continue it with --resume {run_dir}"
        )
    trainer = Trainer(cfg, run_dir, argv, dist, data_dir, resuming=resume)
    trainer.setup()  # data and model errors surface before anything is written
    extended = None
    if resume:
        trainer.restore()
        extended = extend_mod.apply(trainer, saved) if extend else None
        if trainer.should_stop() and trainer._exists(run_dir / "summary.json"):
            distributed.shutdown(dist)
            return json.loads((run_dir / "summary.json").read_text())  # finished: nothing to add
    else:
        if dist.is_main:
            folders.create_run_dir(run_dir, {"config.yaml": config_mod.dump(cfg), "meta.json": trainer.meta_text()})
            copy_plugins(cfg.attention.plugins, run_dir)
            identity.record(run_dir, cfg, trainer.ds)
        distributed.barrier(dist)  # the run directory exists before any rank uses it
    log = EventLog(run_dir, cfg, enabled=dist.is_main, resumed_from=trainer.progress.step if resume else None)
    try:
        trainer.log_start(log, resumed=resume)
        if extended:
            log.log("run_extended", **extended)
        reason = trainer.fit(log)
        summary = trainer.finish(log, reason, wall_start)
    finally:
        log.close()
    # Only after success: after a failure torchrun ends the job, and tearing down NCCL mid-collective can hang.
    distributed.shutdown(dist)
    return summary
