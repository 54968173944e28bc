"""Checkpoints that carry their config, load without unpickling code and survive crashes.

A checkpoint is one file, ``step-NNNNNNN.safetensors``: the raw weights under ``model.*``, the EMA
weights under ``ema.*`` and, for a training run, what resuming needs (optimizer state, step, data
position) as ``training.state``, the bytes of a ``torch.save`` that loads with
``torch.load(weights_only=True)``. Its metadata holds the resolved config (YAML), the step and a
SHA-256 of each group of tensors, so a damaged file (a truncated copy, a node that died mid-write,
flipped bits) is recognised when it is loaded. ``ddim sample`` needs nothing else.

Writing is crash-safe: the file is written under a temporary name in the same directory, flushed
to disk (``fsync``), renamed over its final name and the directory entry fsynced, so a checkpoint
that is listed is complete and on disk; on any error (a full disk, say) the temporary file is
removed and nothing else changes. Files get the permissions the umask gives, like every file the
tool writes.

Checkpoints written before this format (``ddim-cli-checkpoint-1``: no checksums, the training state
in a ``step-NNNNNNN.state.pt`` beside the weights) still load and resume.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ddim_cli.config import Config, ConfigError, config_from_dict

FORMAT = "ddim-cli-checkpoint-2"
_LEGACY_FORMAT = "ddim-cli-checkpoint-1"  # weights only; the training state in a .state.pt beside them
_GROUPS = ("model", "ema", "training")  # tensor-name prefixes, each with its own checksum
_STATE_KEY = "training.state"
_NAME = re.compile(r"^step-(\d+)\.safetensors$")


# What torch.load(weights_only=True) raises for files that are not plain tensors (or not pickles).
UNPICKLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError)
# What its unpickler also raises, from deep inside, on a damaged pickle (a flipped or missing byte:
# "pop from empty list", "unpack requires a buffer of 4 bytes", a storage key not found...).
# torch.load also reads .safetensors files now, and raises their error for a damaged one.
_DAMAGED_PICKLE_ERRORS = (KeyError, IndexError, TypeError, AssertionError, struct.error, SafetensorError)
_UNPICKLER_REASON = "WeightsUnpickler error:"


def load_tensors_only(source: Path | str | io.BytesIO) -> Any:
    """``torch.load(source, map_location="cpu", weights_only=True)``, without torch's warning about
    pickle protocols above 2 (common in real checkpoints, and not the user's problem); raises one of
    :data:`UNPICKLE_ERRORS`, which :func:`unpickle_reason` puts in one line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except _DAMAGED_PICKLE_ERRORS as error:
            raise pickle.UnpicklingError(
                f"not a torch.save file, or a damaged one ({type(error).__name__}: {error})"
            ) from None


def unpickle_reason(error: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one line: torch wraps the unpickler's own
    reason in a paragraph of general advice (its first line is the same for every file)."""
    text = str(error)
    if _UNPICKLER_REASON in text:
        reason = " ".join(text.split(_UNPICKLER_REASON, 1)[1].split("Check the documentation", 1)[0].split())
        if reason:
            return reason
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


class CheckpointError(RuntimeError):
    """A checkpoint problem, described in one line."""


@dataclass
class Checkpoint:
    path: Path
    config: Config
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    training_state: dict[str, Any] | None = None


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:07d}.safetensors"


def state_path(weights_path: Path) -> Path:
    """Where a ``ddim-cli-checkpoint-1`` checkpoint kept its training state."""
    return weights_path.with_name(weights_path.name.replace(".safetensors", ".state.pt"))


def save_checkpoint(
    directory: Path,
    step: int,
    config: Config,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    training_state: dict[str, Any],
) -> Path:
    """Write weights and training state as one file, durably (see the module notes)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = checkpoint_path(directory, step)
    buffer = io.BytesIO()
    torch.save(training_state, buffer)
    state = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    write_weights(weights, step, config, model, ema, training_state=state)
    return weights


def write_weights(
    path: Path,
    step: int,
    config: Config,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    training_state: torch.Tensor | None = None,
) -> None:
    """The self-contained ``.safetensors`` checkpoint: weights, EMA weights, config, step and, for
    training, the serialized training state (uint8)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    # Contiguous copies: safetensors refuses tensors that share memory (e.g. the same weights as
    # model and EMA) and strided ones (channels_last weights).
    def stored(v: torch.Tensor) -> torch.Tensor:
        return v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)

    tensors = {f"model.{k}": stored(v) for k, v in model.items()}
    tensors |= {f"ema.{k}": stored(v) for k, v in ema.items()}
    if training_state is not None:
        tensors[_STATE_KEY] = training_state
    metadata = {"format": FORMAT, "step": str(step), "config": config.to_yaml()}
    metadata |= {f"sha256.{group}": _digest(tensors, group) for group in _GROUPS}
    write_durably(path, save(tensors, metadata=metadata))


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing: a temporary file in the same directory, fsynced,
    renamed over ``path``, the directory fsynced; on any error the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:  # mode 0o666 less the umask, like any other file
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete the temporary files of writes a killed process never finished (call while holding
    the run's lock); returns what was removed."""
    stale = sorted(directory.glob(".*.safetensors.*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def _digest(tensors: dict[str, torch.Tensor], group: str) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors named ``group.*``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(k for k in tensors if k.split(".", 1)[0] == group):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_mismatch(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> str | None:
    """None if ``weights`` fit a model whose state dict is ``expected``; else which keys do not."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    problems = [
        f"{label} {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]
    return "; ".join(problems) or None


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``weights`` (read from ``path``) into ``module``, or a one-line :class:`CheckpointError`
    naming the keys that do not fit the architecture its config builds."""
    mismatch = describe_mismatch(module.state_dict(), weights)
    if mismatch:
        raise CheckpointError(f"the weights in {path} do not fit its config: {mismatch}")
    module.load_state_dict(weights)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint weight files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        state_path(old).unlink(missing_ok=True)
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path, *, training_state: bool = False) -> Checkpoint:
    """Read weights and config, checking their checksums; every problem is a one-line
    :class:`CheckpointError`. ``training_state=True`` also reads and checks what resuming needs
    (the optimizer's and the data's state)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    wanted = ("model", "ema", "training") if training_state else ("model", "ema")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.split(".", 1)[0] in wanted}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a ddim-cli checkpoint or is damaged (not a readable safetensors file: {error})"
        ) from None
    if metadata.get("format") not in (FORMAT, _LEGACY_FORMAT):
        raise CheckpointError(f"{path} is not a ddim-cli checkpoint (metadata format {metadata.get('format')!r})")
    for group in wanted:
        expected = metadata.get(f"sha256.{group}")
        if expected is not None and _digest(tensors, group) != expected:
            raise CheckpointError(f"{path} is damaged: its {group} tensors do not match their checksum")
    if "config" not in metadata:
        raise CheckpointError(f"{path} has no config in its metadata")
    try:
        config = config_from_dict(yaml.safe_load(metadata["config"]))
    except (ConfigError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path} carries an invalid config: {error}") from None
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
    checkpoint = Checkpoint(path, config, int(metadata.get("step", 0)), model, ema)
    if training_state:
        checkpoint.training_state = _training_state(path, tensors.get(_STATE_KEY))
    return checkpoint


def _training_state(path: Path, stored: torch.Tensor | None) -> dict[str, Any]:
    if stored is not None:
        source, name = io.BytesIO(stored.numpy().tobytes()), f"the training state in {path}"
    else:  # a ddim-cli-checkpoint-1 pair
        source, name = state_path(path), str(state_path(path))
        if not source.is_file():
            raise CheckpointError(f"cannot resume from {path}: it holds no training state and {source.name} is missing")
    try:
        return load_tensors_only(source)
    except UNPICKLE_ERRORS as error:
        raise CheckpointError(f"{name} is damaged ({unpickle_reason(error)})") from None


def newest_intact(candidates: list[Path], *, training_state: bool = False) -> Checkpoint:
    """The first of ``candidates`` (newest first) that loads; each damaged one before it is a
    one-line warning naming it and the checkpoint used instead. All damaged: the newest's error."""
    failures = []
    for path in candidates:
        try:
            checkpoint = load_checkpoint(path, training_state=training_state)
        except CheckpointError as error:
            failures.append(error)
            continue
        for error in failures:
            warnings.warn(f"{error}; using {path.name}, the newest intact checkpoint", stacklevel=2)
        return checkpoint
    if not failures:
        raise CheckpointError("no checkpoints to load")
    raise failures[0]
