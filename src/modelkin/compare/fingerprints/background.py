"""A background of real unrelated models: per model a compact record of what the descriptive fingerprints
need (std curves, per-layer QK/VO spectra, vocabulary hash, shape, label, stratum), one directory of files.

Layout (format modelkin-background/1): ``background.json`` marks the directory; each model is
``<slug>.json`` (metadata and std curves) plus ``<slug>.<hash>.npz`` (spectra, float32; read without pickle).
The invariant terms are not stored: they need both models' embeddings of shared tokens, so they are
pair-specific. Writes are atomic. Every model in one stratum must be unrelated to every other one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelkin.errors import InputError
from modelkin.utils import atomic_write_bytes, atomic_write_text

FORMAT = "modelkin-background/1"
MANIFEST = "background.json"
METHODS = ("std_curve", "spectral")  # the methods a record carries statistics for
SEED_ONLY = "seed-only"
HINT = ("create one with `modelkin background add MODEL --dir DIR`, or leave --background out for the "
        "shipped one")


def default_dir() -> Path:
    """The background shipped inside the package (rebuilt by ``python -m bench.background``)."""
    return Path(__file__).resolve().parents[2] / "data" / "background"


@dataclass
class Record:
    """One background model: identity, shape, stratum and the per-model statistics of the methods."""

    label: str
    stratum: str
    architecture: str = ""
    layers: int = 0
    hidden_size: int = 0
    vocab_size: int | None = None
    vocab_hash: str | None = None
    content_hash: str = ""
    source: str = ""
    std_curves: Any = None                     # std_curve.StdCurves
    spectra: list[dict[str, np.ndarray]] | None = None
    notes: list[str] = field(default_factory=list)

    def stats(self, method: str) -> Any:
        """This model's statistics for ``method`` (None when the record has none)."""
        return {"std_curve": self.std_curves, "spectral": self.spectra}.get(method)

    def to_json(self, spectra_file: str | None) -> dict[str, Any]:
        return {"format": FORMAT, "label": self.label, "stratum": self.stratum,
                "architecture": self.architecture,
                "layers": self.layers, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "vocab_hash": self.vocab_hash, "content_hash": self.content_hash, "source": self.source,
                "methods": [m for m in METHODS if self.stats(m) is not None], "notes": self.notes,
                "std_curves": self.std_curves.to_json() if self.std_curves is not None else None,
                "spectra_file": spectra_file}


def slug(label: str) -> str:
    """A file-name-safe form of a label."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")
    return out or "model"


def content_hash(curves: Any) -> str:
    """sha256 of a model's per-layer q/k/v/o std (12 significant digits): equal for identical weights."""
    h = hashlib.sha256(repr(curves.layers).encode())
    for role in sorted(curves.curves):
        h.update(role.encode() + b"".join(f"{x:.12g},".encode() for x in curves.curves[role]))
    return h.hexdigest()


def make_record(model: Any, *, label: str, stratum: str, device: Any = "cpu") -> Record:
    """Compute a model's record (reads only the attention tensors and the vocabulary).

    Args:
        model: a checkpoint path or an open TensorSource.
        label: its name in reports; stratum: e.g. "cross-family", "same-family-other-size", "seed-only".
    """
    import torch

    from modelkin.compare.behaviour.outputs import vocab_hash
    from modelkin.compare.fingerprints import spectral, std_curve
    from modelkin.compare.fingerprints.result import NotApplicable
    from modelkin.compare.fingerprints.weights import open_weights, vocab_strings
    from modelkin.errors import CheckpointError

    dev = torch.device(device) if isinstance(device, str) else device
    with open_weights(model, dev, label) as w:
        curves = std_curve.compute_std_curves(w)
        if len(curves.layers) < 3:
            raise InputError(f"{label}: {len(curves.layers)} layers with q/k/v/o: a background model needs 3",
                             hint="add a model with attention weights in at least 3 layers")
        notes = []
        try:
            spectra = spectral.layer_spectra(w)
        except (CheckpointError, NotApplicable, torch.linalg.LinAlgError) as why:
            spectra = None
            notes.append(f"no spectra: {str(why).splitlines()[0]}")
        vocab = vocab_strings(w)
        cfg = w.config
        hidden = int(cfg.get("hidden_size") or w.info(w.layers[0], "q").shape[1])
        return Record(label=label, stratum=stratum, architecture=str(cfg.get("model_type", "")),
                      layers=len(curves.layers), hidden_size=hidden,
                      vocab_size=len(vocab) if vocab else (int(cfg["vocab_size"]) if cfg.get("vocab_size")
                                                           else None),
                      vocab_hash=vocab_hash(vocab) if vocab else None, content_hash=content_hash(curves),
                      source=Path(str(w.source.path)).name, std_curves=curves, spectra=spectra, notes=notes)


def _spectra_bytes(spectra: list[dict[str, np.ndarray]]) -> bytes:
    arrays = {f"{kind}_{i}": np.asarray(s[kind], dtype=np.float32)
              for i, s in enumerate(spectra) for kind in s}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _read_spectra(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        n = len({k.rsplit("_", 1)[1] for k in data.files})
        return [{kind: data[f"{kind}_{i}"].astype(np.float64) for kind in ("qk", "vo")} for i in range(n)]


def is_background(path: str | Path) -> bool:
    """Whether ``path`` is a background directory (holds a background.json of this format)."""
    manifest = Path(path) / MANIFEST
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def init(path: str | Path, description: str = "") -> Path:
    """Make ``path`` a background directory (kept as it is when it already is one)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a background directory", hint="choose a directory path")
    if not is_background(path):
        if path.is_dir() and any(path.iterdir()):
            raise InputError(f"{path} is a non-empty directory that is not a background", hint=HINT)
        text = json.dumps({"format": FORMAT, "description": description}, indent=1) + "\n"
        atomic_write_text(path / MANIFEST, text)
    return path


@dataclass
class Background:
    """The records of one background directory, and a cache of scores between them (see empirical.py)."""

    path: Path
    records: list[Record]
    cache: dict[Any, Any] = field(default_factory=dict)
    stamp: tuple[Any, ...] = ()  # (name, mtime_ns, size) of every file: keys the on-disk score cache

    @property
    def name(self) -> str:
        return "shipped" if self.path == default_dir() else self.path.name

    def strata(self) -> dict[str, list[Record]]:
        out: dict[str, list[Record]] = {}
        for r in self.records:
            out.setdefault(r.stratum, []).append(r)
        return dict(sorted(out.items()))

    def add(self, record: Record, *, replace: bool = True) -> Path:
        """Write a record (atomic); a record with the same label is replaced.

        Raises:
            InputError: the same weights are already in the background under another label.
        """
        for other in self.records:
            if other.content_hash == record.content_hash and other.label != record.label:
                raise InputError(f"{record.label}: the same weights are already in {self.path} "
                                 f"as {other.label!r}",
                                 hint="a background holds each model once")
        stem = slug(record.label)
        if (self.path / f"{stem}.json").exists() and not replace:
            raise InputError(f"{self.path / stem}.json exists", hint="choose another --label")
        spectra_file = None
        if record.spectra:  # named by content: a replaced record's JSON never points at the new spectra early
            spectra_file = f"{stem}.{record.content_hash[:12]}.npz"
            atomic_write_bytes(self.path / spectra_file, _spectra_bytes(record.spectra))
        text = json.dumps(record.to_json(spectra_file), indent=1) + "\n"
        atomic_write_text(self.path / f"{stem}.json", text)
        for old in self.path.glob(f"{stem}.*.npz"):
            if old.name != spectra_file:
                old.unlink()
        self.records = [r for r in self.records if r.label != record.label] + [record]
        self.cache.clear()
        self.stamp = ()  # changed files: no on-disk scores until loaded again
        return self.path / f"{stem}.json"


def _read_record(file: Path) -> Record:
    from modelkin.compare.fingerprints.std_curve import StdCurves

    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        spectra = _read_spectra(file.parent / data["spectra_file"]) if data.get("spectra_file") else None
        curves = StdCurves.from_json(data["std_curves"]) if data.get("std_curves") else None
        return Record(label=str(data["label"]), stratum=str(data["stratum"]),
                      architecture=data.get("architecture", ""),
                      layers=int(data.get("layers", 0)), hidden_size=int(data.get("hidden_size", 0)),
                      vocab_size=data.get("vocab_size"), vocab_hash=data.get("vocab_hash"),
                      content_hash=str(data.get("content_hash", "")), source=str(data.get("source", "")),
                      std_curves=curves, spectra=spectra, notes=list(data.get("notes") or []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise InputError(f"{file} is not a background record: {err}", hint=HINT) from None


def load(path: str | Path | None = None) -> Background:
    """The background at ``path`` (the shipped one when None).

    Raises:
        InputError: ``path`` is not a background directory or a record in it is unreadable.
    """
    path = Path(path) if path is not None else default_dir()
    if not path.is_dir() or not is_background(path):
        raise InputError(f"{path} is not a background directory (no {MANIFEST} of format {FORMAT})",
                         hint=HINT)
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(path.glob("*.json")))
    return _load(path.resolve(), stamp)


@functools.lru_cache(maxsize=4)
def _load(path: Path, stamp: tuple[Any, ...]) -> Background:
    files = [path / name for name, _, _ in stamp if name != MANIFEST]
    npz = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(path.glob("*.npz")))
    return Background(path=path, records=[_read_record(f) for f in files], stamp=stamp + npz)


def resolve(background: Any) -> Background | None:
    """A Background from what the API takes: None -> the shipped one, False -> none, a path or a Background."""
    if background is False:
        return None
    if isinstance(background, Background):
        return background
    if background is None and not is_background(default_dir()):
        return None  # a source tree where `python -m bench.background` has not run
    return load(background)
