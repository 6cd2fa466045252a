"""Labeling split across two processes on jax.distributed (CPU, localhost), against one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mgd.pipeline import distributed

_LABEL = textwrap.dedent("""
    import json, sys, types
    import jax, numpy as np
    from mgd.pipeline import distributed, model, oracle
    run_dir, port, count, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if count > 1:
        procs = distributed.initialize(f"localhost:{port}", count, index)
        assert (procs.index, procs.count) == (index, count) and len(jax.local_devices()) == 1
    cfg = model.GPTConfig(vocab_size=37, seq_len=8, n_layer=1, n_head=2, d_model=16,
                          attention_impl="xla", compute_dtype="float32")
    rng = np.random.default_rng(4)
    corpus = types.SimpleNamespace(tokens=rng.integers(0, 37, (20, 9)).astype(np.int32),
                                   target_tokens=rng.integers(0, 37, (6, 9)).astype(np.int32))
    params = model.init_params(cfg, jax.random.key(5))
    oc = oracle.OracleConfig(k=4, inner_steps=2, inner_lr=1e-2, rounds=5, target_batch=3,
                             warm_start=False)
    labels = oracle.label(params, corpus, cfg, oc, run_dir, progress=False)
    print("RESULT " + json.dumps({"tau": labels.round_tau.tolist(),
                                  "phi": labels.round_phi.tolist(),
                                  "scores": labels.scores.tolist()}), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _result(proc) -> dict:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:])


def test_two_processes_label_as_one_does_and_keep_finished_rounds(tmp_path):
    """Process i labels rounds i, i + 2, ...; process 0 merges; both return the labels,
    identical to one process's. A round process 1 finished before (its shard planted with a
    marker) is kept, not redone."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    script = tmp_path / "label.py"
    script.write_text(_LABEL)
    single = subprocess.Popen([sys.executable, str(script), str(tmp_path / "one"), "0", "1", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Process 1's round 3, finished by an earlier (killed) run: a marker value.
    from mgd.pipeline import label_shards, oracle
    two = tmp_path / "two"
    oc = oracle.OracleConfig(k=4, inner_steps=2, rounds=5, target_batch=3)
    key = label_shards.digest(*oracle.plan_rounds(20, oc, 6))
    label_shards.save_shard(two, 1, key, {3: label_shards.Round(np.full(4, 7.0), 1.5, 2.5)})

    # The single run finishes first: three JAX processes on a 2-core CI machine can starve
    # the coordination service's heartbeats past its timeout.
    want = _result(single)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(two), port, "2", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    got = [_result(p) for p in procs]
    assert got[0] == got[1]
    tau = np.array(got[0]["tau"])
    assert np.all(tau[3] == 7.0) and got[0]["phi"][3] == 1.5
    keep = [0, 1, 2, 4]
    np.testing.assert_array_equal(tau[keep], np.array(want["tau"])[keep])
    np.testing.assert_array_equal(np.array(got[0]["phi"])[keep], np.array(want["phi"])[keep])
    summary = json.loads((two / "oracle" / "summary.json").read_text())
    assert (summary["processes"], summary["devices"]) == (2, 2)
    assert not (two / label_shards.SHARDS).exists()


def test_processes_split_rounds_and_check_launch_settings():
    assert distributed.Processes(1, 3).rounds(8) == [1, 4, 7]
    assert distributed.Processes().rounds(3) == [0, 1, 2]
    distributed.Processes().barrier("alone: nothing to wait for")
    assert distributed.from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
                                 "JAX_PROCESS_ID": "2"}) == {
        "coordinator": "h:1", "num_processes": 4, "process_id": 2}
    for args, words in [(("host", 2, 0), "HOST:PORT"), (("h:1", 2, 2), "below"),
                        (("h:1", 0, 0), "num-processes"), (("h:1", None, 0), "--num-processes")]:
        with pytest.raises(ValueError, match=words):
            distributed.initialize(*args)
    assert distributed.initialize(None, 1, 0) == distributed.Processes()


def test_barrier_uses_the_coordination_service_else_the_public_collective(monkeypatch):
    """The service's barrier (with its timeout) where JAX exposes it; else JAX's public
    sync_global_devices, so that a JAX without the private client still runs."""
    from jax.experimental import multihost_utils
    with pytest.raises(RuntimeError, match="not initialized"):
        distributed.Processes(0, 2).barrier("x")
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: True)
    calls = []

    class Client:
        def wait_at_barrier(self, barrier_id, timeout_ms):
            calls.append(("service", barrier_id, timeout_ms))

    monkeypatch.setattr(distributed, "_coordination_client", Client)
    distributed.Processes(0, 2).barrier("labels", timeout_s=3)
    monkeypatch.setattr(distributed, "_coordination_client", lambda: None)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda n: calls.append(("public", n)))
    distributed.Processes(1, 2).barrier("merged")
    assert calls[0][0] == "service" and calls[0][1].endswith("/labels") and calls[0][2] == 3000
    assert calls[1][0] == "public" and calls[1][1].endswith("/merged")
