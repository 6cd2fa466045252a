"""Crash-safe files for the pipeline's run folders.

Every output is written to a temporary name in its final folder and moved into
place with `os.replace`, which is atomic on POSIX: a run killed mid-write leaves
the previous file (or nothing), never a truncated one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_write_json", "atomic_save_arrays", "load_arrays", "read_json", "stage", "Stage"]


def _temp_beside(path: Path, suffix: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    return fd, Path(tmp)


def atomic_write_json(path, obj) -> None:
    path = Path(path)
    fd, tmp = _temp_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(x):
    # numpy scalars and small arrays show up in stats and logs.
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def read_json(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such JSON file: {path}")
    with open(path) as f:
        return json.load(f)


def atomic_save_arrays(path, **arrays) -> None:
    """Save named arrays as an uncompressed .npz, atomically."""
    path = Path(path)
    fd, tmp = _temp_beside(path, ".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_arrays(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such array file: {path}")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class Stage:
    """One resumable step of a run: `run_dir/name/`, complete iff it holds `DONE`.

        st = stage(run_dir, "corpus")
        if not st.done:
            with st as tmp:          # an empty temporary folder beside the final one
                write_outputs(tmp)
        read_outputs(st.path)

    Leaving the `with` block normally writes `DONE` into the temporary folder and
    renames it to `run_dir/name`; an exception discards it. A folder without
    `DONE` (from a run killed before this helper existed, or by hand) is replaced.
    """

    def __init__(self, run_dir, name: str):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"stage name must be a plain folder name, got {name!r}")
        self.path = Path(run_dir) / name
        self._tmp: Path | None = None

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def __enter__(self) -> Path:
        if self.done:
            raise RuntimeError(f"stage {self.path} is already complete; check `.done` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        return self._tmp

    def __exit__(self, exc_type, exc, tb):
        tmp, self._tmp = self._tmp, None
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        (tmp / "DONE").write_text("complete\n")
        if self.path.exists():
            # Incomplete leftovers: move aside first so the rename below is atomic.
            stale = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.stale.", dir=self.path.parent))
            os.replace(self.path, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, self.path)
        return False


def stage(run_dir, name: str) -> Stage:
    return Stage(run_dir, name)
