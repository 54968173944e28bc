"""Checkpoints that carry their config and load without unpickling code.

A checkpoint is ``step-NNNNNNN.safetensors`` holding the raw weights under ``model.*`` and the EMA
weights under ``ema.*``, with the resolved config (YAML) and the step in its metadata; so ``ddim
sample`` needs nothing else. Beside it, ``step-NNNNNNN.state.pt`` holds what resuming needs
(optimizer state, step, data position, RNG scheme) and loads with ``torch.load(weights_only=True)``.
Both are written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ddim_cli.config import Config, ConfigError, config_from_dict

FORMAT = "ddim-cli-checkpoint-1"
_NAME = re.compile(r"^step-(\d+)\.safetensors$")


# What torch.load(weights_only=True) raises for files that are not plain tensors (or not pickles).
UNPICKLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError)


class CheckpointError(RuntimeError):
    """A checkpoint problem, described in one line."""


@dataclass
class Checkpoint:
    path: Path
    config: Config
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:07d}.safetensors"


def state_path(weights_path: Path) -> Path:
    return weights_path.with_name(weights_path.name.replace(".safetensors", ".state.pt"))


def save_checkpoint(
    directory: Path,
    step: int,
    config: Config,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    training_state: dict[str, Any],
) -> Path:
    """Write the training state, then the weights (the file that makes the checkpoint visible)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = checkpoint_path(directory, step)
    _atomic(state_path(weights), lambda tmp: torch.save(training_state, tmp))
    write_weights(weights, step, config, model, ema)
    return weights


def write_weights(
    path: Path, step: int, config: Config, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]
) -> None:
    """The self-contained ``.safetensors`` checkpoint: weights, EMA weights, config and step."""
    path.parent.mkdir(parents=True, exist_ok=True)

    # Contiguous copies: safetensors refuses tensors that share memory (e.g. the same weights as
    # model and EMA) and strided ones (channels_last weights).
    def stored(v: torch.Tensor) -> torch.Tensor:
        return v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)

    tensors = {f"model.{k}": stored(v) for k, v in model.items()}
    tensors |= {f"ema.{k}": stored(v) for k, v in ema.items()}
    metadata = {"format": FORMAT, "step": str(step), "config": config.to_yaml()}
    _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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


def load_checkpoint(path: Path) -> Checkpoint:
    """Read weights and config; every problem is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a ddim-cli checkpoint (not a readable safetensors file: {error})"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ddim-cli checkpoint (metadata format {metadata.get('format')!r})")
    if "config" not in metadata:
        raise CheckpointError(f"{path} has no config in its metadata")
    try:
        config = config_from_dict(yaml.safe_load(metadata["config"]))
    except (ConfigError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path} carries an invalid config: {error}") from None
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
    return Checkpoint(path, config, int(metadata.get("step", 0)), model, ema)


def load_training_state(weights_path: Path) -> dict[str, Any]:
    path = state_path(weights_path)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} (the training state of {weights_path.name}) is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
