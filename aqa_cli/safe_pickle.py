"""Restricted unpickling for the pickle files this package has to read.

A pickle is a small program: any global it names gets imported and may be
called while loading, so opening an untrusted ``.pkl`` is equivalent to running
untrusted code.  Third-party checkpoints and annotation files are exactly such
files, so we never use :func:`pickle.load` on them.  Instead each loader below
admits only an explicit allow-list of globals -- the minimum needed to rebuild
plain data -- and refuses everything else before it can be imported.
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any, Mapping

import numpy as np

__all__ = [
    "UnsafePickleError",
    "RestrictedUnpickler",
    "load_numpy_pickle",
    "load_plain_pickle",
]

PathLike = str | os.PathLike[str]


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle names a global that is not on the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``allowed``.

    ``allowed`` maps ``(module, name)`` as written in the pickle stream to the
    object to hand back.  Mapping to an object (rather than importing by name)
    lets legacy names such as ``numpy.core.multiarray`` resolve to their current
    location without touching the deprecated module.
    """

    def __init__(self, file: Any, allowed: Mapping[tuple[str, str], Any], *, encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = dict(allowed)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: not on the allow-list"
            ) from None


def _numpy_multiarray() -> Any:
    # numpy>=2 moved the implementation to numpy._core and warns when the old
    # numpy.core path is imported; numpy 1.x only has numpy.core.
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _numpy_allow_list() -> dict[tuple[str, str], Any]:
    ma = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    # Pickles written by numpy 1.x say numpy.core, by numpy 2.x numpy._core.
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = ma._reconstruct
        allowed[(mod, "scalar")] = ma.scalar
    return allowed


# Containers and numbers that the pickle protocol cannot express with opcodes
# alone.  None of them can execute code or touch the file system.
_PLAIN_ALLOW_LIST: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def _load(path: PathLike, allowed: Mapping[tuple[str, str], Any], encoding: str) -> Any:
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, allowed, encoding=encoding).load()


def load_numpy_pickle(path: PathLike, *, encoding: str = "ASCII") -> Any:
    """Load a pickle of plain containers and numpy arrays (e.g. a weight tree).

    Only numpy's array/scalar reconstruction is admitted, so a tampered file
    fails with :class:`UnsafePickleError` instead of running code.  Python-2
    era files need ``encoding="latin1"``; protocol-2 files written by Python 3
    encode array bytes through ``_codecs.encode`` and are refused.
    """
    return _load(path, _numpy_allow_list(), encoding)


def load_plain_pickle(path: PathLike, *, encoding: str = "ASCII") -> Any:
    """Load a pickle of plain Python data (dicts, lists, str, numbers, sets).

    Meant for annotation files; anything needing a non-trivial global is refused.
    ``encoding`` only matters for Python-2 era files (see :class:`pickle.Unpickler`).
    """
    return _load(path, _PLAIN_ALLOW_LIST, encoding)
