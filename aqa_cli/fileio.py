"""Crash-safe file writing and hashing.

Every output is written to a temporary file in the destination folder and then
renamed over the target. A rename within one filesystem is atomic, so a run
killed at any moment leaves either the old file or the complete new one, never
a half-written file that a later run could mistake for a finished one.

A temporary's name carries its writer's pid and a tag of its host
(``.aqa-tmp-<pid>.<host>-<name>``): folders on a shared filesystem are written
by processes on several machines (``--engine ray``), and a pid only says
whether a writer is alive on its own machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

TMP_MARK = ".aqa-tmp-"
# Which machine wrote a temporary: 8 hex digits of the host name's sha256 (no "-", which separates the name).
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_MARK}{os.getpid()}.{HOST_TAG}-{target.name}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(target: str | Path, write: Callable[[Path], None]) -> Path:
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def write_json(target: str | Path, obj: object) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def write_npy(target: str | Path, array: np.ndarray) -> Path:
    def _write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    return atomic_write(target, _write)


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
