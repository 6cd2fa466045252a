"""Base training: it learns, it resumes exactly, it evaluates what it says."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from mgd.pipeline import model, train

CFG = model.GPTConfig(vocab_size=48, seq_len=12, n_layer=1, n_head=2, d_model=16,
                      attention_impl="xla", compute_dtype="float32")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, CFG.vocab_size, (6, CFG.seq_len + 1)).astype(np.int32)
    return base, np.tile(base, (4, 1))          # a memorizable corpus of 24 rows


def test_training_lowers_the_loss_and_logs_evals():
    base, rows = _data()
    params = model.init_params(CFG, jax.random.key(0))
    tc = train.TrainConfig(steps=40, batch_size=6, lr=1e-2, warmup=4, eval_every=20,
                           eval_batch_size=4)
    before = train.eval_loss(params, base, CFG, 4)
    params, log = train.train(params, rows, CFG, tc, eval_sets={"base": base}, progress=False)
    assert [e["step"] for e in log] == list(range(1, 41))
    evals = [e for e in log if "eval" in e]
    assert [e["step"] for e in evals] == [20, 40]
    after = evals[-1]["eval"]["base"]
    assert after < 0.6 * before
    assert after == pytest.approx(train.eval_loss(params, base, CFG, 4), rel=1e-5)
    assert log[0]["lr"] == 0.0 and max(e["lr"] for e in log) == pytest.approx(1e-2)


class _Killed(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    _, rows = _data(1)
    init = model.init_params(CFG, jax.random.key(1))
    tc = train.TrainConfig(steps=8, batch_size=5, lr=5e-3, warmup=2, ckpt_every=3, eval_every=4)
    evals = {"rows": rows[:4]}
    straight, log_a = train.train(init, rows, CFG, tc, eval_sets=evals, progress=False)

    # Kill the run right after its step-6 checkpoint is on disk.
    real_save = train._save

    def save_then_die(ckpt_dir, step, *args):
        real_save(ckpt_dir, step, *args)
        if step == 6:
            raise _Killed

    monkeypatch.setattr(train, "_save", save_then_die)
    with pytest.raises(_Killed):
        train.train(init, rows, CFG, tc, ckpt_dir=tmp_path, eval_sets=evals, progress=False)
    monkeypatch.setattr(train, "_save", real_save)
    resumed, log_b = train.train(init, rows, CFG, tc, ckpt_dir=tmp_path, eval_sets=evals,
                                 progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert log_a == log_b
    # Finished: a third call only loads it.
    again, log_c = train.train(init, rows, CFG, tc, ckpt_dir=tmp_path, progress=False)
    assert log_c == log_b
    with pytest.raises(ValueError, match="other configs"):
        train.train(init, rows, CFG, train.TrainConfig(steps=9), ckpt_dir=tmp_path, progress=False)


def test_eval_loss_over_uneven_batches_and_batch_plan():
    _, rows = _data(2)
    params = model.init_params(CFG, jax.random.key(2))
    ref = float(np.mean(model.per_example_loss(params, rows[:11], CFG)))
    assert train.eval_loss(params, rows[:11], CFG, 4) == pytest.approx(ref, rel=1e-6)
    assert train.eval_loss(params, rows[:3], CFG, 4) == pytest.approx(
        float(np.mean(model.per_example_loss(params, rows[:3], CFG))), rel=1e-6)
    # One epoch = disjoint batches covering floor(n / b) * b rows; epochs differ.
    ep0 = np.concatenate([train.batch_indices(23, 5, 0, s) for s in range(4)])
    assert len(set(ep0.tolist())) == 20
    assert not np.array_equal(train.batch_indices(23, 5, 0, 0), train.batch_indices(23, 5, 0, 4))
    with pytest.raises(ValueError, match="batch_size"):
        train.batch_indices(3, 5, 0, 0)


def test_train_argument_errors():
    params = model.init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match=r"seq_len \+ 1 = 13"):
        train.train(params, np.zeros((4, 9), np.int32), CFG, train.TrainConfig(steps=1),
                    progress=False)
    with pytest.raises(ValueError, match="steps"):
        train.TrainConfig(steps=0)
