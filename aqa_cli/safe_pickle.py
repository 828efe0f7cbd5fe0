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
    "load_annotation_pickle",
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


def _numpy_scalar_allow_list() -> dict[tuple[str, str], Any]:
    # A numpy number (np.float64(71.4), np.int64(3)) pickles as multiarray.scalar(dtype, raw bytes): it rebuilds
    # one number from its bytes. Array reconstruction (_reconstruct, ndarray) is deliberately not admitted.
    ma = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "scalar")] = ma.scalar
    return allowed


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call as ``_codecs.encode(text, "latin1")`` to rebuild bytes
    (here: a numpy scalar's raw bytes). Only that one codec is admitted, so it can only turn text into bytes."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def load_annotation_pickle(path: PathLike, *, encoding: str = "latin1") -> Any:
    """Load a dataset's annotation pickle: plain containers, strings and numbers, numpy scalars included.

    Annotation files such as MTL-AQA's ``final_annotations_dict.pkl`` map tuples to dicts of numbers, some
    of them numpy scalars; nothing else is admitted. ``latin1`` (the default here) reads Python-2 era files'
    byte strings, as numpy scalars from them need; plain-ASCII text reads the same under it.
    """
    return _load(path, {**_PLAIN_ALLOW_LIST, **_numpy_scalar_allow_list()}, encoding)
