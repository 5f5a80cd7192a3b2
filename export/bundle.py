"""The bundle: one directory holding everything needed to serve one trained model, verified on load.

Layout (BUNDLE_DIR)::

    manifest.json     what the model is, how to serve it, sha256 of every other file
    vocab.json        original item ids, list position i -> model index i + 1
    popularity.npy    training clicks per item [n_items + 1] (answers for unknown items)
    model.onnx        hidden / window kinds (ONNX, top-K inside the graph)
    model.pt          graph kind (a torch state dict, loaded with weights_only=True)
    model.npz         items kind (the model's named arrays, no pickle)
    config.json       graph kind: the run config the torch model is rebuilt from

A bundle is written into a temporary sibling directory and renamed into place
at the very end, so an export that fails (parity, int8 overlap, a bug) leaves
nothing behind. Loading refuses anything it cannot vouch for: an unknown schema
version, a file missing or listed without checksum, a checksum mismatch.
Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from streamrec.errors import UserError
from training.data import Vocab

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema_version", "model", "model_version", "state_kind", "n_items", "k", "hidden_size", "history_len", "model_file", "files", "created_at")
STATE_KINDS = ("hidden", "window", "graph", "items")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_version(name: str, weights_sha256: str, created: datetime) -> str:
    """``name-<8 hex of the weights>-<UTC time>-<4 random hex>``: unique per export, readable in logs."""
    return f"{name}-{weights_sha256[:8]}-{created:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def versions() -> dict[str, str]:
    """Library versions the bundle was made with (recorded, shown by `bundle inspect`)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("streamrec", "torch", "onnx", "onnxruntime", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


class BundleWriter:
    """Collects a bundle's files in a temporary directory; ``seal`` writes the manifest, ``commit`` moves it into place.

    Use as a context manager: leaving the block without ``commit`` (an exception,
    a failed check) deletes the temporary directory and leaves ``out`` untouched.
    """

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise UserError(f"{self.out} already exists (pass --force to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def seal(self, manifest: dict) -> dict:
        """Checksum every file and write manifest.json in the temporary directory (callable again after changes)."""
        for p in self.tmp.iterdir():
            if p.is_dir():
                raise RuntimeError(f"bundle files must be flat, found directory {p.name}")
        names = sorted(p.name for p in self.tmp.iterdir() if p.name != MANIFEST)
        created = datetime.now(timezone.utc)
        manifest = {"schema_version": SCHEMA_VERSION, **manifest}
        manifest["files"] = {name: sha256_file(self.tmp / name) for name in names}
        manifest["model_version"] = model_version(manifest["model"], manifest["files"][manifest["model_file"]], created)
        manifest["created_at"] = created.isoformat(timespec="seconds")
        manifest["versions"] = versions()
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return manifest

    def commit(self) -> None:
        """Move the sealed bundle to ``out`` (replacing an older one only when allowed at construction)."""
        if not (self.tmp / MANIFEST).is_file():
            raise RuntimeError("commit() before seal()")
        os.chmod(self.tmp, 0o755)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{secrets.token_hex(3)}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)


@dataclass
class Bundle:
    """A verified bundle: its directory, manifest, vocabulary and popularity counts."""

    path: Path
    manifest: dict
    vocab: Vocab
    popularity: np.ndarray  # [n_items + 1] float64

    def file(self, name: str) -> Path:
        return self.path / name

    def load_npz(self, name: str) -> dict[str, np.ndarray]:
        """The named arrays of one of the bundle's .npz files; an object array (a pickle) is refused."""
        try:
            with np.load(self.file(name), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise UserError(unreadable_array(self.path, name, e)) from None


def unreadable_array(bundle_dir: Path, name: str, error: Exception) -> str:
    """The one-line error for an array file that numpy cannot load without unpickling, or at all."""
    if "allow_pickle" in str(error):
        return f"{bundle_dir}: {name} holds pickled Python objects, which streamrec never loads (a bundle holds plain numeric arrays only; re-export the model)"
    return f"{bundle_dir}: {name} unreadable ({error})"


def read_manifest(bundle_dir: Path) -> dict:
    """manifest.json, parsed and checked for schema version and required keys (files not verified)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir}: no such bundle directory (make one with `streamrec export`)")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{bundle_dir}: not a bundle (manifest.json missing)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: unreadable manifest (not a JSON object)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: bundle schema_version {version!r} is not supported (this streamrec reads version {SCHEMA_VERSION}; re-export the model)")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["state_kind"] not in STATE_KINDS:
        raise UserError(f"{path}: unknown state_kind {manifest['state_kind']!r} (known: {', '.join(STATE_KINDS)})")
    if not isinstance(manifest["files"], dict):
        raise UserError(f"{path}: manifest 'files' is not a mapping of name to sha256")
    return manifest


def open_bundle(bundle_dir: str | Path) -> Bundle:
    """Read and verify a bundle: every listed file present with its checksum, vocabulary consistent."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    files = manifest["files"]
    for required in ("vocab.json", "popularity.npy", manifest["model_file"]):
        if required not in files:
            raise UserError(f"{bundle_dir}: manifest does not list {required}")
    for name, expected in files.items():
        path = bundle_dir / name
        if Path(name).name != name:
            raise UserError(f"{bundle_dir}: manifest lists a file outside the bundle ({name})")
        if not path.is_file():
            raise UserError(f"{bundle_dir}: {name} missing")
        if sha256_file(path) != expected:
            raise UserError(f"{bundle_dir}: {name} is corrupted (sha256 does not match the manifest)")
    vocab = Vocab.load(bundle_dir / "vocab.json")
    n_items = int(manifest["n_items"])
    if vocab.n_items != n_items:
        raise UserError(f"{bundle_dir}: vocab.json has {vocab.n_items} items but the manifest says {n_items}")
    try:
        popularity = np.load(bundle_dir / "popularity.npy", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(unreadable_array(bundle_dir, "popularity.npy", e)) from None
    if popularity.shape != (n_items + 1,):
        raise UserError(f"{bundle_dir}: popularity.npy has shape {popularity.shape}, expected ({n_items + 1},)")
    return Bundle(bundle_dir, manifest, vocab, popularity.astype(np.float64))


def format_manifest(manifest: dict) -> str:
    """The manifest as aligned `key: value` lines (nested mappings indented), for `bundle inspect`."""
    lines: list[str] = []

    def emit(key: str, value, indent: int) -> None:
        pad = "  " * indent
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            for k, v in value.items():
                emit(str(k), v, indent + 1)
        elif isinstance(value, float):
            lines.append(f"{pad}{key}: {value:.4g}")
        elif isinstance(value, list) and len(value) > 8:
            lines.append(f"{pad}{key}: [{', '.join(map(str, value[:8]))}, ... ({len(value)} in all)]")
        else:
            lines.append(f"{pad}{key}: {value}")

    for key, value in manifest.items():
        emit(key, value, 0)
    return "\n".join(lines)
