"""pytest wiring for the benchmarks: markers, where saved runs go, GPU skips,
and the extra fields of the saved JSON (GPU name, commit, out-of-memory points).

pytest's configuration is the repository's pyproject.toml (tests/ only), so the
benchmark defaults live here instead of in an ini file.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

from bench import harness
from mgd.devices import gpu_unavailable_reason

BENCH_DIR = Path(__file__).resolve().parent
# pytest-benchmark's own default is ./.benchmarks relative to wherever pytest
# was started; one fixed place makes --benchmark-compare find earlier runs.
DEFAULT_STORAGE = f"file://{BENCH_DIR / '.benchmarks'}"
PLUGIN_DEFAULT_STORAGE = "file://./.benchmarks"

MARKERS = (
    "cpu_subset: small shapes of the benchmarks that CI runs on CPU",
    "e2e: end-to-end benchmark of one metagradient round",
)


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark opens its storage (trylast)
def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    if getattr(config.option, "benchmark_storage", None) == PLUGIN_DEFAULT_STORAGE:
        config.option.benchmark_storage = DEFAULT_STORAGE


def _gpu_skip_reason():
    # MGD_BENCH_ALLOW_CPU=1 runs the "gpu" grid on whatever JAX has (a tiny grid
    # on a CPU, to try the harness and the report without a GPU).
    if os.environ.get("MGD_BENCH_ALLOW_CPU") == "1":
        return None
    return gpu_unavailable_reason()


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if BENCH_DIR in Path(str(item.path)).resolve().parents]
    if not any("gpu" in item.keywords for item in ours):
        return
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in ours:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["accelerator"] = harness.device_name()
    machine_info["jax"] = jax.__version__


def pytest_benchmark_update_commit_info(config, commit_info):
    # pytest-benchmark reads git itself; the lent GPU gets a copy without .git.
    if commit_info.get("id") in (None, "", "unknown", "unversioned"):
        commit_info["id"] = harness.commit()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["mgd_oom"] = list(harness.OOM_RECORDS)
