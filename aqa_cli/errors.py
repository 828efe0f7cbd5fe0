"""User-facing errors.

Every failure a user can cause or fix (a bad video, a missing checkpoint, a
wrong feature shape) is raised as :class:`AqaError`. Its text is one line that
names the file and says what to do, and the CLI prints it without a traceback.
Anything else that escapes is a bug in ``aqa`` and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class AqaError(Exception):
    """An error with a one-line, actionable message.

    ``path`` is the file the error is about (if any) and ``fix`` is the advice
    shown after the reason, e.g. ``"re-encode it with ffmpeg"``.
    """

    def __init__(self, reason: str, *, path: str | Path | None = None, fix: str | None = None):
        self.reason = " ".join(str(reason).split())
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.path}: {self.reason}" if self.path else self.reason
        if self.fix:
            text += f" — {self.fix}"
        return text


class VideoError(AqaError):
    """The video cannot be opened or decoded."""


class WeightsError(AqaError):
    """A checkpoint is missing, corrupt, unsafe or of the wrong architecture."""


class FeatureError(AqaError):
    """A feature file is missing, malformed, or breaks a head's contract."""
