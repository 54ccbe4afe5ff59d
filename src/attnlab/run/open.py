"""Opening a run directory: its config (with the run's own plugin copies), its dataset (checked against the
run's record) and a checkpoint's model; and the dataset and model config a new run starts from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import config as config_mod
from ..config import Config, ModelConfig
from ..data import store, tasks
from ..data.image_format import IMAGE_VOCAB
from ..data.image_sources import IMAGE_SOURCES
from ..data.store import Dataset
from ..errors import CheckpointError, ConfigError, DataError
from ..folders import check_run_dir
from ..model.gpt import GPT
from ..training import checkpoint as ckpt
from ..training.memory import check_fits
from ..training.runtime import pick_device
from . import identity, vocabulary
from .plugins import load_run_plugins
from .vocabulary import RunVocabulary

EVAL_DATA_HINT = "--data-dir DIR"


def default_data_dir(data_cfg) -> Path:
    """data/<source>-<tokenizer>-<hash of the data config>: distinct settings never collide."""
    record = json.dumps(store.config_record(data_cfg), sort_keys=True)
    digest = hashlib.sha256(record.encode()).hexdigest()[:8]
    source = Path(data_cfg.source).name.split(".")[0] or "data"
    if data_cfg.source in IMAGE_SOURCES:  # bytes of pixels: no tokenizer
        return Path("data") / f"{source}-{data_cfg.image_size or 'native'}px-{digest}"
    vocab = data_cfg.vocab_size if data_cfg.tokenizer == "bpe" else ""
    return Path("data") / f"{source}-{data_cfg.tokenizer}{vocab}-{digest}"


def open_dataset(data_cfg, *, progress: bool = True) -> store.Dataset:
    """The prepared dataset for this config, preparing it on first use (a generated task: nothing on disk).

    A dataset that exists already supplies the data.* settings the config left
    unset (``config.load`` fills them in from its meta.json, so ``data.dir``
    alone suffices); settings given that differ are refused."""
    if tasks.is_task(data_cfg):
        return tasks.TaskDataset.from_config(data_cfg)
    path = Path(data_cfg.dir) if data_cfg.dir else default_data_dir(data_cfg)
    if not (path / "meta.json").exists():
        store.prepare(data_cfg, path, progress=progress, wait=True)  # a run preparing it too: wait, reuse
    ds = store.load(path)
    _check_data_config(ds, data_cfg, path)
    return ds


RESUME_DATA_HINT = "data.dir=DIR after --resume RUN_DIR"


def open_run_dataset(
    run_dir: Path, data_cfg, *, data_dir=None, rebuild: bool, hint: str, progress: bool = True
) -> store.Dataset:
    """A run's dataset, checked against the one it recorded (identity.json).

    It is looked for at ``data_dir`` (the user's pointer to a copy), else in the
    absolute folder that identity.json recorded (runs without one: data.dir or
    the default folder). A missing dataset is rebuilt from the recorded settings
    only when ``rebuild`` (resume), never for eval or sample.
    """
    if tasks.is_task(data_cfg):  # generated problems: nothing recorded on disk to find or check
        return tasks.TaskDataset.from_config(data_cfg)
    recorded = identity.recorded_dataset(run_dir)
    path = run_dataset_path(run_dir, data_cfg, data_dir)
    rebuilt = None
    if not (path / "meta.json").exists():
        if not rebuild:
            raise identity.missing_dataset(run_dir, path, hint)
        settings = identity.rebuild_config(run_dir, data_cfg)
        store.prepare(settings, path, progress=progress)
        rebuilt = settings.source
    ds = store.load(path)
    if recorded is None:  # a run from before identity.json: its settings are all there is to compare
        _check_data_config(ds, data_cfg, path)
    identity.check_dataset(run_dir, ds, hint, rebuilt_from=rebuilt)
    return ds


def run_dataset_path(run_dir: Path, data_cfg, data_dir=None) -> Path:
    """Where a run's dataset is looked for: ``data_dir``, else the folder identity.json recorded, else data.dir."""
    recorded = identity.recorded_dataset(run_dir)
    return Path(data_dir or (recorded or {}).get("dir") or data_cfg.dir or default_data_dir(data_cfg))


def open_run_data(
    run_dir: Path, data_cfg, *, data_dir=None, need_data: bool = True, hint: str = EVAL_DATA_HINT
) -> store.Dataset | RunVocabulary:
    """A run's dataset (``open_run_dataset``, never rebuilt); where only its vocabulary is needed
    (``need_data`` false: sampling, export) and the dataset is absent, the run's own copies (``vocabulary.py``).

    Runs from before the copies, and a ``data_dir`` given explicitly, need the dataset itself."""
    record = identity.read(run_dir)
    if not need_data and data_dir is None and not tasks.is_task(data_cfg) and vocabulary.has_copies(record):
        path = run_dataset_path(run_dir, data_cfg)
        if not (path / "meta.json").exists():
            return vocabulary.open_copies(run_dir, record, identity.missing_dataset(run_dir, path, hint))
    return open_run_dataset(run_dir, data_cfg, data_dir=data_dir, rebuild=False, hint=hint, progress=False)


def _check_data_config(ds: store.Dataset, data_cfg, path: Path) -> None:
    want, have = store.config_record(data_cfg), ds.meta.get("data_config", {})
    explicit = config_mod.explicit_keys(data_cfg)
    # The location of a local copy does not change the data; its hash (in meta) does.
    keys = [k for k in sorted(want) if k != "path" and k in have]
    differ = [k for k in keys if k in explicit and have[k] != want[k]]
    if differ:
        listed = lambda d: ", ".join(f"data.{k}={d[k]!r}" for k in differ)
        raise DataError(
            f"{path} was prepared with {listed(have)} but the config says {listed(want)}: drop these keys "
            f"(data.dir alone takes the dataset's settings) or set data.dir to another folder"
        )


def fit_model_to_data(cfg: Config, ds: store.Dataset | RunVocabulary) -> tuple[int, ModelConfig]:
    """The model's vocabulary and its model config completed from the dataset (a copy: ``cfg`` is not changed).

    An image model predicts bytes 0..255 and reads one more token, the start of
    an image (SOS = 256): its vocabulary is 257, its context one image, and its
    image shape the dataset's unless the config names it. Text and task models get the dataset's document
    separator (``model.eos_id``), which document masking and position reset read.
    """
    if ds.kind != "image":
        return ds.vocab_size, _with_separator(cfg, ds)
    _refuse_documents(cfg, f"the image dataset {ds.dir} has no <eos> between its images")
    image = ds.meta["image"]
    shape, n = [image["height"], image["width"], image["channels"]], int(ds.meta["tokens_per_image"])
    m = cfg.model
    if m.context != n:
        raise ConfigError(
            f"model.context={m.context} must equal the bytes of one image ({'x'.join(map(str, shape))} = {n}) "
            f"for the image dataset {ds.dir}: set model.context={n}"
        )
    if m.image_shape and list(m.image_shape) != shape:
        raise ConfigError(
            f"model.image_shape={m.image_shape} does not match the dataset's {shape}: "
            f"set model.image_shape={','.join(map(str, shape))} or leave it empty"
        )
    return IMAGE_VOCAB, dataclasses.replace(m, image_shape=shape)


def _refuse_documents(cfg: Config, why: str) -> None:
    """ConfigError if the config asks for documents (document masking, position reset) and the data has none."""
    if cfg.attention.document_mask:
        raise ConfigError(f"attention.document_mask=true needs documents separated by <eos>, but {why}: set it false")
    if cfg.model.position_reset != "none":
        raise ConfigError(
            f"model.position_reset={cfg.model.position_reset} needs documents separated by <eos>, but {why}: "
            "set model.position_reset=none"
        )


def _with_separator(cfg: Config, ds: store.Dataset | RunVocabulary) -> ModelConfig:
    """The model config with ``eos_id`` = the dataset's document separator (refusing a different one given)."""
    m = cfg.model
    eos = (ds.meta.get("tokenizer") or {}).get("eos_id")
    if eos is None:
        _refuse_documents(cfg, f"the dataset {ds.dir} records no <eos> id")
        return m
    if m.eos_id is not None and m.eos_id != eos:
        raise ConfigError(
            f"model.eos_id={m.eos_id} is not the document separator of the dataset {ds.dir} ({eos}): "
            "leave model.eos_id unset"
        )
    return dataclasses.replace(m, eos_id=int(eos))


# ------------------------------------------------------------------ run directory


def load_run_config(run_dir: Path) -> Config:
    """The run's config.yaml (checked against identity.json), reading the block layout from the run's own copy."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(
            f"{run_dir} is not a run directory (no config.yaml): pass the folder that `attnlab train` created"
        )
    identity.check_config_file(run_dir)
    load_run_plugins(run_dir)  # the run's own copies, before its config names their patterns
    return config_mod.load(path, identity.layout_overrides(run_dir))


@dataclass
class LoadedRun:
    dir: Path
    cfg: Config
    dataset: Dataset | RunVocabulary  # the run's own vocabulary copies where the dataset was not needed and is absent
    model: GPT
    checkpoint: Path
    device: torch.device


def load_run(
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    data_dir: str | Path | None = None,
    *,
    need_data: bool = True,
    hint: str = EVAL_DATA_HINT,
) -> LoadedRun:
    """A run's config, its own dataset (never prepared here; ``data_dir`` points at a copy) and a checkpoint's model.

    The config, dataset and block layout must be the ones the run recorded (identity.json). ``need_data=False``
    (sampling, export): a run whose dataset folder is gone uses its own tokenizer and vocabulary copies instead;
    a split's tokens then raise the missing-dataset error, which names ``hint``."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(
            f"{run_dir} has no complete checkpoint yet: wait for the first checkpoint or resume the run"
        )
    dataset = open_run_data(run_dir, cfg.data, data_dir=data_dir, need_data=need_data, hint=hint)
    dev = pick_device(device)
    vocab, model_cfg = fit_model_to_data(cfg, dataset)
    check_fits(cfg, vocab, dev, training=False, batch_size=cfg.train.eval_batch_size, model_cfg=model_cfg)
    model = GPT(model_cfg, cfg.attention, vocab)
    weights, _ = ckpt.load_checkpoint(path, model)
    ckpt.check_finite(path, weights)
    model.to(dev).eval().resolve_backends(dev)
    return LoadedRun(run_dir, cfg, dataset, model, path, dev)
