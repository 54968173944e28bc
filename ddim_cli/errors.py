"""Faults a user can cause, described in one line."""

from __future__ import annotations

import errno

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.EIO: "input/output error",
}


def os_error_reason(error: OSError) -> str:
    """``"no space left on the device"`` and the like."""
    return _REASONS.get(error.errno) or error.strerror or str(error) or type(error).__name__


def describe_os_error(error: OSError) -> str:
    """``"no space left on the device: runs/x/checkpoints/step-0000500.safetensors"`` and the like."""
    reason = os_error_reason(error)
    return f"{reason}: {error.filename}" if error.filename is not None else reason


class TrainingError(RuntimeError):
    """Training or distillation cannot start or go on; described in one line."""
