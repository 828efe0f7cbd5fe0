"""Which files a command takes: the one input rule of ``aqa score`` and ``aqa extract-features``.

The rule, as both commands' ``--help`` states it:

- A file named on the command line is always tried (a failure then says why, in one line).
- A folder is searched recursively. From it, files with a video extension (:data:`VIDEO_EXTENSIONS`) or with no
  extension at all are taken, and for ``aqa score`` feature files (``.npy``; the ``.json`` beside one is its
  sidecar). Everything else (``README.md``, scripts, label files, images…) is skipped, and the skipped files are
  counted in a single note. Hidden files and folders (a leading ``.``, which covers our own temporaries) are left
  out without a note.
- A named path that does not exist stops the command before anything runs (the usual cause is a typo).

This module imports neither torch nor numpy, so that a missing file is reported at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aqa_cli.errors import AqaError

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".mts",
    ".m2ts", ".gif", ".ogv", ".mxf", ".vob", ".dv", ".asf", ".f4v", ".3g2", ".y4m",
)
FEATURE_SUFFIX = ".npy"
# The input rule in words, shared by both commands' --help.
FOLDER_RULE = ("Folders are searched recursively for files with a video extension (mp4, mov, mkv, avi, webm…) "
               "or none; other files there are skipped with one note. A file named here is always tried.")


@dataclass
class FoundInputs:
    """The files to process, in order, and what a folder search passed over."""

    paths: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # files in searched folders that the rule leaves out

    def skipped_note(self) -> str | None:
        """One line on what was skipped, e.g. ``skipped 5 files that are not videos (.py ×2, .csv, .json, .md)``."""
        if not self.skipped:
            return None
        kinds = Counter(p.suffix.lower() or p.name for p in self.skipped)
        listed = ", ".join(f"{kind} ×{n}" if n > 1 else kind for kind, n in sorted(kinds.items()))
        files = "file" if len(self.skipped) == 1 else "files"
        return (f"skipped {len(self.skipped)} {files} that {'is' if len(self.skipped) == 1 else 'are'} not "
                f"{'a video' if len(self.skipped) == 1 else 'videos'} ({listed}); name a file to try it anyway")


def _taken_from_folder(path: Path, *, features: bool) -> bool:
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS or suffix == "":
        return True
    return features and suffix == FEATURE_SUFFIX


def _is_sidecar(path: Path) -> bool:
    return path.suffix.lower() == ".json" and path.with_suffix(FEATURE_SUFFIX).is_file()


def find_inputs(inputs: Iterable[str | Path], *, features: bool, exclude: Iterable[str | Path] = ()) -> FoundInputs:
    """Expand files and folders by the rule above into a de-duplicated list (each folder's files sorted).

    ``features`` also takes ``.npy`` feature files from folders (``aqa score``); ``exclude`` names files never to
    take (the command's own outputs). Raises :class:`AqaError` naming every input that does not exist.
    """
    inputs = [Path(p) for p in inputs]
    missing = [p for p in inputs if not p.exists()]
    if missing:
        names = ", ".join(map(str, missing))
        raise AqaError(f"{names}: no such file or folder", fix="check the path")
    excluded = {Path(p).resolve() for p in exclude}
    found = FoundInputs()
    seen: set[Path] = set()
    skipped: dict[Path, Path] = {}
    for p in inputs:
        if p.is_dir():
            candidates = []
            for q in sorted(p.rglob("*")):
                if not q.is_file() or any(part.startswith(".") for part in q.relative_to(p).parts):
                    continue
                if q.resolve() in excluded or (features and _is_sidecar(q)):
                    continue
                if _taken_from_folder(q, features=features):
                    candidates.append(q)
                else:
                    skipped.setdefault(q.resolve(), q)
        else:
            candidates = [p]
        for q in candidates:
            key = q.resolve()
            if key not in seen and key not in excluded:
                seen.add(key)
                found.paths.append(q)
    found.skipped = [q for key, q in skipped.items() if key not in seen]  # unless also named outright
    return found
