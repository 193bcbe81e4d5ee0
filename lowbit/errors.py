"""Exceptions shared across lowbit.

Every error a user can cause is a subclass of ``LowbitError`` or of ``ValueError``
(bad input), so the CLI can turn it into one clear line instead of a traceback.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of lowbit's own errors."""


class TrainingError(LowbitError, RuntimeError):
    """Training cannot go on (for example the loss became NaN or infinite)."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint file is missing pieces, of another format, or corrupt."""


class TrainingInterrupted(LowbitError):
    """The user pressed Ctrl-C; a checkpoint was saved at ``path``."""

    def __init__(self, path: str | None, epoch: int, step: int):
        self.path, self.epoch, self.step = path, epoch, step
        where = f"epoch {epoch + 1}, step {step}"
        saved = f"; checkpoint saved to {path}" if path else ""
        super().__init__(f"interrupted at {where}{saved}")


class FormatError(LowbitError, ValueError):
    """A ``.lowbit`` file is malformed, damaged, or of a newer format version."""
