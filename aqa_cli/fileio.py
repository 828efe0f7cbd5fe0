"""Crash-safe file writing and hashing: the one way ``aqa`` writes a file.

Every output is written to a temporary file in the destination folder and then
renamed over the target. A rename within one filesystem is atomic, so a run
killed at any moment leaves either the old file or the complete new one, never
a half-written file that a later run could mistake for a finished one.

The temporary is created by :func:`tempfile.mkstemp` (``O_CREAT|O_EXCL|O_NOFOLLOW``,
a random part in its name) and written through the descriptor that created it,
never reopened by name: a link planted in a shared output folder under a name a
writer will use is never followed, and the rename replaces a link at the target
itself instead of writing through it.

A temporary's name carries its writer's pid and a tag of its host
(``.aqa-tmp-<pid>.<host>-<random>-<name>``): folders on a shared filesystem are written
by processes on several machines (``--engine ray``), and a pid only says
whether a writer is alive on its own machine. The first write into a folder
removes the temporaries that killed writers of this machine left there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

TMP_MARK = ".aqa-tmp-"
# Which machine wrote a temporary: 8 hex digits of the host name's sha256 (no "-", which separates the name).
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# Of the target's name, the temporary keeps the end (a name near the filesystem's 255-byte limit must still fit).
_NAME_KEPT = 80


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are made with the permissions an ordinary open() gives them (mkstemp's are 0600).
_FILE_MODE = 0o666 & ~_umask()
_swept: set[Path] = set()
_swept_lock = threading.Lock()


def _sweep_once(folder: Path) -> None:
    """Remove the stale temporaries of ``folder`` the first time this process writes there."""
    key = folder.resolve()
    with _swept_lock:
        if key in _swept:
            return
        _swept.add(key)
    with contextlib.suppress(OSError):
        remove_stale_temporaries(folder)


@contextlib.contextmanager
def atomic_open(target: str | Path) -> Iterator[BinaryIO]:
    """A binary file object for a fresh temporary beside ``target``, renamed over ``target`` on success.

    The temporary is removed when the block raises; ``target`` is then left as it was.
    """
    target = Path(target)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    _sweep_once(folder)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_MARK}{os.getpid()}.{HOST_TAG}-", suffix=f"-{target.name[-_NAME_KEPT:]}",
                                dir=folder)
    tmp = Path(name)
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(target: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``target`` atomically: ``write(fh)`` fills a binary file object (see :func:`atomic_open`)."""
    with atomic_open(target) as fh:
        write(fh)
    return Path(target)


def write_bytes(target: str | Path, data: bytes) -> Path:
    return atomic_write(target, lambda fh: fh.write(data))


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: object) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_npy(target: str | Path, array: np.ndarray) -> Path:
    return atomic_write(target, lambda fh: np.save(fh, array, allow_pickle=False))


def write_npz(target: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    return atomic_write(target, lambda fh: np.savez(fh, **arrays))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries left by killed runs in ``folder``; returns how many.

    A temporary whose writer is still alive (another run sharing the folder) is kept, and so is
    one written on another machine, whose writer this machine cannot see.
    """
    n = 0
    for p in Path(folder).glob(f"{TMP_MARK}*"):
        pid, _, host = p.name[len(TMP_MARK) :].split("-", 1)[0].partition(".")
        if host and host != HOST_TAG:
            continue
        if pid.isdigit() and process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
