"""experiments/run_snapshot.py: a run's base model and features as bfloat16 bits and back."""
import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

_path = Path(__file__).resolve().parents[1] / "run_snapshot.py"
_spec = importlib.util.spec_from_file_location("run_snapshot", _path)
snap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(snap)


@given(st.integers(0, 10_000))
def test_bf16_bits_round_like_jax_bfloat16(seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=500) * 10.0 ** rng.integers(-12, 6, 500)).astype(np.float32)
    x[:3] = [0.0, -0.0, 1.0 + 2.0 ** -8]              # a tie: rounds to even
    want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(snap.from_bf16_bits(snap.to_bf16_bits(x)), want)


def test_pack_unpack_gives_the_rounded_base_in_the_pipelines_layout(tmp_path):
    import jax

    from mgd.pipeline import artifacts
    from mgd.pipeline.model import GPTConfig, init_params
    from mgd.pipeline.run import load_params
    cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, d_model=16)
    params = init_params(cfg, jax.random.PRNGKey(3))
    leaves = {f"leaf_{i:05d}": np.asarray(v) for i, v in
              enumerate(jax.tree_util.tree_leaves(params))}
    base = tmp_path / "run" / "base"
    base.mkdir(parents=True)
    artifacts.atomic_save_arrays(base / "params.npz", **leaves)
    artifacts.atomic_save_arrays(base / "adam_nu.npz",
                                 **{k: np.abs(v) * 1e-9 for k, v in leaves.items()})
    (base / "adam_count.json").write_text('{"count": 7}')
    (base / "summary.json").write_text('{"eval_loss": 4.25}')
    with pytest.raises(FileNotFoundError, match="not a finished base stage"):
        snap.pack(tmp_path / "run", tmp_path / "out")
    (base / "DONE").write_text("ok")
    feats = np.random.default_rng(0).normal(size=(5, 17)).astype(np.float32)
    (tmp_path / "run" / "features").mkdir()
    artifacts.atomic_save_arrays(tmp_path / "run" / "features" / "features.npz", features=feats)
    (tmp_path / "run" / "features" / "DONE").write_text("ok")
    snap.pack(tmp_path / "run", tmp_path / "out")
    snap.unpack(tmp_path / "out", tmp_path / "back")
    back = tmp_path / "back" / "base"
    got = jax.tree_util.tree_leaves(load_params(back / "params.npz", cfg))
    for v, g in zip(leaves.values(), got):
        np.testing.assert_array_equal(np.asarray(g), snap.from_bf16_bits(snap.to_bf16_bits(v)))
        assert np.max(np.abs(np.asarray(g) - v)) <= 2 ** -8 * np.max(np.abs(v))
    nu = artifacts.load_arrays(back / "adam_nu.npz")
    assert all(np.all(nu[k] > 0) == np.all(leaves[k] != 0) for k in leaves)  # no underflow
    meta = json.loads((back / "snapshot_meta.json").read_text())
    assert (meta["adam_count"], meta["eval_loss"]) == (7, 4.25)
    f = artifacts.load_arrays(tmp_path / "back" / "features" / "features.npz")["features"]
    np.testing.assert_array_equal(f, snap.from_bf16_bits(snap.to_bf16_bits(feats)))
    assert not any((tmp_path / "back" / d / "DONE").exists() for d in ("base", "features"))
