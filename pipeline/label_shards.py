"""Finished labeling rounds on disk, one file per process, so that a killed run loses none.

Each process keeps the rounds it finished in `run_dir/oracle_shards/shard-<i>.npz`,
rewritten atomically after every group of rounds. A resumed run (with any number of
processes) reads every shard whose rounds were planned the same way (`digest`), and the
single-process file of earlier versions (`oracle_partial.npz`), so it redoes only the
rounds no file holds. The process that merges reads them all once every process is done.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgd.pipeline import artifacts

__all__ = ["Round", "digest", "load_finished", "load_shard", "save_shard", "clear", "SHARDS"]

log = logging.getLogger(__name__)

SHARDS = "oracle_shards"
LEGACY = "oracle_partial.npz"


@dataclass(frozen=True)
class Round:
    """One finished round: tau [k], Phi after and before the inner steps."""
    tau: np.ndarray
    phi: float
    phi0: float


def digest(round_indices, round_targets) -> str:
    """Names the planned rounds: shards of another plan are not read."""
    h = hashlib.sha256()
    for a in (round_indices, round_targets):
        a = np.ascontiguousarray(np.asarray(a, np.int64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def _shard_path(run_dir, index: int) -> Path:
    return Path(run_dir) / SHARDS / f"shard-{index}.npz"


def _read(path: Path, key: str) -> dict[int, Round]:
    a = artifacts.load_arrays(path)
    if str(a.get("digest", "")) != key:
        log.warning(f"{path}: rounds planned differently (another oracle config); not read")
        return {}
    return {int(r): Round(t, float(p), float(p0)) for r, t, p, p0 in
            zip(a["round_ids"], a["round_tau"], a["round_phi"], a["round_phi0"])}


def load_shard(run_dir, index: int, key: str) -> dict[int, Round]:
    """The rounds process `index` saved (of the plan `key`)."""
    path = _shard_path(run_dir, index)
    return _read(path, key) if path.exists() else {}


def load_finished(run_dir, key: str, round_indices) -> dict[int, Round]:
    """Every finished round any process saved, by round id."""
    out: dict[int, Round] = {}
    legacy = Path(run_dir) / LEGACY
    if legacy.exists():
        saved = artifacts.load_arrays(legacy)
        if np.array_equal(saved["round_indices"], round_indices):
            phi0 = saved.get("round_phi0", np.full(len(saved["round_phi"]), np.nan))
            for r in range(int(saved["done"])):
                out[r] = Round(saved["round_tau"][r], float(saved["round_phi"][r]), float(phi0[r]))
    folder = Path(run_dir) / SHARDS
    if folder.is_dir():
        for path in sorted(folder.glob("shard-*.npz")):
            out.update(_read(path, key))
    return out


def save_shard(run_dir, index: int, key: str, rounds: dict[int, Round]) -> None:
    """Process `index`'s finished rounds, written atomically."""
    ids = sorted(rounds)
    artifacts.atomic_save_arrays(
        _shard_path(run_dir, index), digest=np.array(key), round_ids=np.array(ids, np.int64),
        round_tau=np.stack([rounds[r].tau for r in ids]) if ids else np.zeros((0, 0)),
        round_phi=np.array([rounds[r].phi for r in ids], np.float64),
        round_phi0=np.array([rounds[r].phi0 for r in ids], np.float64))


def clear(run_dir) -> None:
    """Remove the shards and the old partial file (once the labels are merged)."""
    shutil.rmtree(Path(run_dir) / SHARDS, ignore_errors=True)
    (Path(run_dir) / LEGACY).unlink(missing_ok=True)
