"""Crash-safe checkpoints: safetensors weights + a weights-only ``state.pt``.

Layout of one checkpoint::

    runs/<name>/checkpoints/step_00000100/
        model.safetensors   weights (tied tensors stored once, aliases in the metadata)
        state.pt            torch.save of plain data: optimizer, scheduler, rng, data cursor, trainer
        COMPLETE            JSON: format, step, size and sha256 of the two files

Why it survives a SIGKILL at any point: everything, ``COMPLETE`` last, is
written and fsync'ed inside ``step_XXXXXXXX.tmp-<pid>``, a name nothing reads;
only then is the folder renamed to its final name in one atomic
``os.replace``. So a folder with a final name is always whole. Re-saving a
step that already exists first renames the old folder to
``step_XXXXXXXX.old-<pid>`` (still a complete checkpoint that
``latest_checkpoint`` finds), moves the new one in, then deletes the old one.
Folders are deleted by first renaming them to a ``.tmp-`` name, so a deletion
cut short never leaves a damaged folder under a name that counts. Leftovers
are cleaned up by the next save. One process writes to a run directory at a time
(under torchrun, rank 0, after the others have helped gather FSDP's shards; they
wait at a barrier until the checkpoint is complete).

Loading never runs code: ``torch.load(weights_only=True)`` and safetensors,
after checking both files against the size and sha256 in ``COMPLETE``. A
checkpoint whose files later differ from it (missing, cut short, altered) is
damaged: loading it, or its run directory, says so and how to fall back; it is
never passed over silently.

A checkpoint holds only finite weights and optimizer state (``NonFiniteState``
otherwise, and nothing is written); a save that runs out of disk space or
past the file-size limit removes its temporary folder and says how much room
it needs, leaving the previous checkpoint as the latest.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from ..errors import CheckpointError
from ..files import file_sha256

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "set_rng_state",
    "atomic_write_bytes",
    "atomic_write_text",
]

FORMAT = 1
WEIGHTS, STATE, MARKER = "model.safetensors", "state.pt", "COMPLETE"
_ALIASES_KEY = "attnlab.aliases"  # safetensors metadata: {"lm_head.weight": "tok_emb.weight", ...}
_NAME = re.compile(r"^step_(\d+)(\.old-\d+)?$")  # folders that may hold a complete checkpoint
_TMP = re.compile(r"\.tmp-(\d+)$")  # folders being written or deleted
_FALLBACK = "delete that folder to fall back to the run's previous checkpoint, or retrain"


def _on_stage(stage: str) -> None:
    """Called between the steps of a save; tests replace it to kill the process at each stage."""


class NonFiniteState(CheckpointError):
    """Weights or optimizer state hold NaN/inf: such a checkpoint is never written."""


# ------------------------------------------------------------ atomic files


def _fsync_dir(path: Path) -> None:
    # Makes a rename/creation inside ``path`` durable; not supported on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a writer killed mid-write left it: nothing reads it
        m = _TMP.search(stale.name)
        if m and stale != tmp and not _pid_alive(int(m.group(1))):
            stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------ rng


def rng_state(device=None) -> dict:
    """Python, numpy and torch generator states as tensors and plain values (weights_only-loadable).

    ``device`` (a torch.device or string) selects the accelerator generator to
    include; by default CUDA's when CUDA is available.
    """
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if kind == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if kind == "mps" and hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(d: dict) -> None:
    """Restore what ``rng_state`` captured; accelerator states are skipped when that device is absent."""
    py = d["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = d["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(d["torch"].cpu())
    if "cuda" in d and torch.cuda.is_available():
        for i, s in enumerate(d["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    if "mps" in d and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(d["mps"].cpu())


# ------------------------------------------------------------ folder bookkeeping


def _ckpt_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _read_marker(ckpt: Path) -> dict | None:
    try:
        marker = json.loads((ckpt / MARKER).read_text())
        files = marker["files"]
        numbers = [marker["step"], marker.get("format", FORMAT)] + [files[n]["bytes"] for n in (WEIGHTS, STATE)]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in numbers):
            raise TypeError("a number of the marker is not an integer")  # e.g. "format": "1"
        if not all(isinstance(files[n]["sha256"], str) for n in (WEIGHTS, STATE)):
            raise TypeError("a digest of the marker is not a string")
        return marker
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_complete(ckpt: Path) -> bool:
    """Its save finished: COMPLETE parses. A save writes it last, before the folder gets its name, so files
    that differ from it later (missing, cut short, altered) are damage, which loading reports (``_verify``),
    rather than an unfinished save to pass over silently for an older checkpoint."""
    return _read_marker(ckpt) is not None


def _complete(run_dir) -> list[tuple[int, bool, Path]]:
    """Complete checkpoints as (step, has final name, path), oldest first."""
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), m.group(2) is None, p))
    return sorted(found)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir``, or None."""
    found = _complete(run_dir)
    return found[-1][2] if found else None


def _remove_dir(path: Path) -> None:
    # Rename first: a deletion cut short then leaves only an ignored .tmp- folder.
    trash = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are from an earlier failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clean_leftovers(root: Path) -> None:
    """Remove .tmp- folders of dead saves; settle .old- folders left by an interrupted re-save."""
    for p in root.iterdir():
        tmp = _TMP.search(p.name)
        if tmp and not _pid_alive(int(tmp.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            continue
        m = _NAME.match(p.name)
        if m and m.group(2):
            final = root / _step_name(int(m.group(1)))
            if not final.exists():
                os.replace(p, final)  # the re-save died between its two renames: put the old one back
            elif _is_complete(final):
                _remove_dir(p)


def prune_checkpoints(run_dir, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (incomplete folders are left to the next save)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    found = _complete(run_dir)
    for _, _, path in found[:-keep]:
        _remove_dir(path)


# ------------------------------------------------------------ weights


def _tensor_key(t: torch.Tensor) -> tuple:
    if hasattr(t, "to_local"):  # an FSDP2 DTensor: tied parameters share their local shard
        t = t.to_local()
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: first name} for entries that are the very same tensor (tied weights)."""
    aliases, seen = {}, {}
    for name, t in state_dict.items():
        aliases_to = seen.setdefault(_tensor_key(t), name)
        if aliases_to != name:
            aliases[name] = aliases_to
    return aliases


def _dedupe(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once (safetensors refuses shared memory) and remember the aliases."""
    aliases = _aliases(state_dict)
    tensors, storages = {}, set()
    for name, t in state_dict.items():
        if name in aliases:
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        # Partly overlapping views are rare; they are saved as independent copies.
        t = t.detach().clone() if storage in storages else t.detach()
        storages.add(storage)
        tensors[name] = t.cpu().contiguous()
    return tensors, aliases


def _full_weights(model: nn.Module, weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The module's state dict, or ``weights`` (its gathered full copy) with the module's ties restored."""
    if weights is None:
        return model.state_dict()
    return {**weights, **{name: weights[target] for name, target in _aliases(model.state_dict()).items()}}


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
        weights = {k: f.get_tensor(k) for k in f.keys()}
    for name, target in aliases.items():
        weights[name] = weights[target]  # the same tensor object: the tie is kept
    return weights


# ------------------------------------------------------------ state


def _plain(obj, where: str = "state"):
    """Check that ``obj`` loads with weights_only=True; numpy scalars become Python numbers."""
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size, torch.device)):
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which a weights_only checkpoint cannot hold: "
        "store tensors, numbers, strings, lists or dicts"
    )


# ------------------------------------------------------------ save / load


def save_checkpoint(
    run_dir, step: int, model: nn.Module, state: dict, weights: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXXX`` crash-safely and return its path.

    ``state`` must be plain data (tensors, numbers, strings, lists, dicts), e.g.
    ``{"optimizer": ..., "scheduler": ..., "rng": rng_state(), "data": ..., "step": ..., "trainer": ...}``.
    ``weights`` replaces ``model.state_dict()`` when the module holds only a shard (FSDP2's gathered full copy).
    """
    state = _plain(state)
    tensors, aliases = _dedupe(_full_weights(model, weights))
    root = _ckpt_root(run_dir)
    final = root / _step_name(step)
    bad = first_non_finite(tensors) or first_non_finite(state.get("optimizer"), "optimizer")
    if bad:
        raise NonFiniteState(f"checkpoint {final} not written: {bad} is not finite")
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    need = _bytes_needed(tensors, state)
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(_no_room(final, need, free, errno.ENOSPC))
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    try:
        _write_files(tmp, step, tensors, aliases, state)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code = _space_errno(e)
        if code is None:
            raise
        raise CheckpointError(_no_room(final, need, shutil.disk_usage(root).free, code)) from None
    _move_into_place(tmp, final)
    _on_stage("done")
    return final


def _write_files(tmp: Path, step: int, tensors: dict[str, torch.Tensor], aliases: dict[str, str], state: dict) -> None:
    tmp.mkdir()
    _on_stage("tmp_created")
    safetensors.torch.save_file(tensors, str(tmp / WEIGHTS), metadata={_ALIASES_KEY: json.dumps(aliases)})
    _chmod_like_umask(tmp / WEIGHTS)  # safetensors creates it 0600; every other file of a run follows the umask
    _on_stage("weights_written")
    torch.save(state, tmp / STATE)
    _on_stage("state_written")
    files = {}
    for name in (WEIGHTS, STATE):
        _fsync_file(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
    atomic_write_text(tmp / MARKER, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    _fsync_dir(tmp)
    _on_stage("marker_written")


def _chmod_like_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ------------------------------------------------------------ finite numbers and room on disk


def first_non_finite(tree, where: str = "") -> str | None:
    """The name of the first floating-point tensor or number in ``tree`` holding NaN/inf, else None."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return where or "a tensor"
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for k, v in items:
        found = first_non_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def check_finite(ckpt: Path, weights: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN/inf (from an older attnlab, or written by other tools)."""
    bad = first_non_finite(weights)
    if bad:
        raise CheckpointError(
            f"checkpoint {ckpt} holds weights that are not finite ({bad}): the training diverged "
            f"before it was saved; use an earlier checkpoint (--checkpoint) or retrain"
        )


def _bytes_needed(tensors: dict[str, torch.Tensor], state: dict) -> int:
    """About the size of the checkpoint's files: its tensors' bytes plus room for headers and small values."""

    def size(tree) -> int:
        if isinstance(tree, torch.Tensor):
            return tree.numel() * tree.element_size()
        if isinstance(tree, dict):
            return sum(size(v) for v in tree.values())
        if isinstance(tree, (list, tuple)):
            return sum(size(v) for v in tree)
        return 0

    return size(tensors) + size(state) + (1 << 16)


def _space_errno(e: BaseException) -> int | None:
    """ENOSPC/EFBIG/EDQUOT behind a failed write (safetensors and torch report them in their messages), else None."""
    codes = [errno.ENOSPC, errno.EFBIG] + ([errno.EDQUOT] if hasattr(errno, "EDQUOT") else [])
    if isinstance(e, OSError):
        return e.errno if e.errno in codes else None
    text = str(e)
    for code in codes:
        if f"os error {code})" in text or os.strerror(code) in text:
            return code
    return None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _no_room(final: Path, need: int, free: int, code: int) -> str:
    run_dir = final.parent.parent
    if code == errno.EFBIG:
        why = f"it needs about {_mb(need)}, more than this process may write to one file (ulimit -f; {_mb(free)} free)"
        fix = "raise the limit (ulimit -f unlimited)"
    else:
        why = f"it needs about {_mb(need)} and {final.parent} has {_mb(free)} free"
        fix = "free some disk space"
    return (
        f"cannot write checkpoint {final}: {why}; the previous checkpoint is kept: {fix}, "
        f"then continue with attnlab train --resume {run_dir}"
    )


def _move_into_place(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():  # re-saving a step (e.g. on interrupt right after a periodic save)
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        _fsync_dir(final.parent)
        _on_stage("old_moved")
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        _on_stage("new_moved")
        _remove_dir(old)


def _resolve(path_or_run_dir) -> Path:
    p = Path(path_or_run_dir)
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {p} not found: pass a run directory (runs/<name>) "
            "or one of its checkpoints/step_* folders"
        )
    is_run_dir = (p / "checkpoints").is_dir() or p.name == "checkpoints"
    if (p / MARKER).exists() or (p / WEIGHTS).exists() or (_NAME.match(p.name) and not is_run_dir):
        return p  # a checkpoint folder (complete or not: _verify says which)
    run_dir = p.parent if p.name == "checkpoints" else p
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(
            f"{run_dir} has no complete checkpoint: train it first (attnlab train) "
            "or pass a run directory that has runs/<name>/checkpoints/step_*"
        )
    return latest


def _config_hint(ckpt: Path) -> str:
    cfg = ckpt.parent.parent / "config.yaml"
    return f"use the config it was trained with ({cfg})" if cfg.exists() else "use the config it was trained with"


def _verify(ckpt: Path) -> dict:
    if not (ckpt / MARKER).exists():
        raise CheckpointError(
            f"checkpoint {ckpt} is incomplete (no {MARKER} marker: its save was interrupted): "
            f"load the run directory {ckpt.parent.parent} to use its newest complete checkpoint"
        )
    marker = _read_marker(ckpt)
    if marker is None:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable {MARKER} marker: {_FALLBACK}")
    if marker.get("format", FORMAT) > FORMAT:
        raise CheckpointError(
            f"checkpoint {ckpt} has format {marker['format']} (this attnlab reads {FORMAT}): upgrade attnlab"
        )
    for name, info in marker["files"].items():
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {name}: {_FALLBACK}")
        size = (ckpt / name).stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {ckpt} is damaged ({name} has {size:,} bytes where {MARKER} records "
                f"{info['bytes']:,}): {_FALLBACK}"
            )
        if file_sha256(ckpt / name) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupted ({name} does not match its sha256 in {MARKER}): {_FALLBACK}"
            )
    return marker


def check_matches(ckpt: Path, weights: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Names, shapes and ties must agree, else the error names the first differing tensor."""
    expected = model.state_dict()
    problem = None
    for name, t in expected.items():
        if name not in weights:
            problem = f"{name}: in the model, not in the checkpoint"
        elif tuple(weights[name].shape) != tuple(t.shape):
            problem = f"{name}: checkpoint {list(weights[name].shape)} vs model {list(t.shape)}"
        if problem:
            break
    if problem is None:
        extra = sorted(set(weights) - set(expected))
        problem = f"{extra[0]}: in the checkpoint, not in the model" if extra else None
    if problem is None:
        for name, target in _aliases(expected).items():  # tied in the model but trained untied
            if weights[name] is not weights[target] and not torch.equal(weights[name], weights[target]):
                problem = f"{name}: tied to {target} in the model, trained untied"
                break
    if problem:
        raise CheckpointError(f"checkpoint {ckpt} was made for a different model ({problem}): {_config_hint(ckpt)}")


def _load_problem(e: Exception) -> str:
    """What made a load fail, in one line; torch's weights_only refusal is reduced to the object it refused
    (its advice to load with weights_only=False would run the file's code: never follow it)."""
    text = str(e)
    if "Weights only load failed" in text:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
        what = f"a {refused.group(1)} object" if refused else "objects"
        return f"state.pt holds {what}, not the plain tensors and numbers attnlab writes"
    return (text.splitlines() or [type(e).__name__])[0][:200]


def load_checkpoint(path_or_run_dir, model: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, state) of a checkpoint folder, or of a run directory's newest complete checkpoint.

    Both files are checked against their sha256 first. With ``model``, the
    weights are loaded into it strictly (in place, so tied parameters stay tied).
    """
    ckpt = _resolve(path_or_run_dir)
    _verify(ckpt)
    try:
        weights = _load_weights(ckpt / WEIGHTS)
        state = torch.load(ckpt / STATE, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any parse failure means an unusable file
        raise CheckpointError(f"checkpoint {ckpt} cannot be read safely ({_load_problem(e)}): {_FALLBACK}") from None
    if model is not None:
        check_matches(ckpt, weights, model)
        model.load_state_dict(weights, strict=True)
    return weights, state
