"""A run's base model and scorer features, small enough to come back from the device,
and back again.

    python experiments/run_snapshot.py pack RUN_DIR OUT_DIR      # on the device
    python experiments/run_snapshot.py unpack IN_DIR DEST_DIR    # here

`pack` writes `base_params.npz` and `base_adam_nu.npz` (each leaf in bfloat16, stored as
its 16 raw bits, since numpy has no bfloat16: the demo's 5.2M parameters make 10 MiB a
file, under the device's 16 MiB a file), `features.npz` (the scorer's features of every
row, likewise; 14 MiB for the demo) when the run has them, and `snapshot_meta.json` (the
Adam step count and the base model's evaluation loss). `unpack` writes float32
`DEST_DIR/base/params.npz` and `adam_nu.npz` in the pipeline's own layout
(`run.load_params` reads them) with the meta, and `DEST_DIR/features/features.npz`, so
that selections can be studied and retrained on CPU. It writes no DONE markers and no
first Adam moment: what it made is no finished stage, and the pipeline will not take it
for one. Every value is rounded to bfloat16 (the model's compute precision on the
device, not its stored float32): say so when a result rests on it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the upper 16 bits after round-to-nearest-even (bfloat16's bits)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _save_bits(path: Path, arrays) -> None:
    np.savez_compressed(path, **{k: to_bf16_bits(v) for k, v in arrays.items()})


def _load_bits(path: Path) -> dict:
    with np.load(path) as z:
        return {k: from_bf16_bits(z[k]) for k in z.files}


def pack(run_dir: Path, out: Path) -> None:
    base = run_dir / "base"
    if not (base / "DONE").exists():
        raise FileNotFoundError(f"{base} is not a finished base stage")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("params", "adam_nu"):
        with np.load(base / f"{name}.npz") as z:
            _save_bits(out / f"base_{name}.npz", {k: z[k] for k in z.files})
    if (run_dir / "features" / "DONE").exists():
        with np.load(run_dir / "features" / "features.npz") as z:
            _save_bits(out / "features.npz", {k: z[k] for k in z.files})
    meta = {"adam_count": json.loads((base / "adam_count.json").read_text())["count"],
            "eval_loss": json.loads((base / "summary.json").read_text())["eval_loss"],
            "precision": "bfloat16 (round to nearest even) of the float32 values"}
    (out / "snapshot_meta.json").write_text(json.dumps(meta, indent=1))


def unpack(src: Path, dest: Path) -> None:
    from mgd.pipeline import artifacts
    (dest / "base").mkdir(parents=True, exist_ok=True)
    for name in ("params", "adam_nu"):
        artifacts.atomic_save_arrays(dest / "base" / f"{name}.npz",
                                     **_load_bits(src / f"base_{name}.npz"))
    if (src / "features.npz").exists():
        (dest / "features").mkdir(exist_ok=True)
        artifacts.atomic_save_arrays(dest / "features" / "features.npz",
                                     **_load_bits(src / "features.npz"))
    meta = json.loads((src / "snapshot_meta.json").read_text())
    artifacts.atomic_write_json(dest / "base" / "snapshot_meta.json", meta)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(Path(sys.argv[2]), Path(sys.argv[3]))
