import os

import jax
import pytest
from hypothesis import HealthCheck, settings

from mgd.devices import gpu_unavailable_reason

# Float64 is needed for the reference checks of the xla backend; it does not change
# the dtype of any float32/bf16/fp16 array the tests build explicitly.
jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "quick", max_examples=4, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "device", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With MGD_TEST_LOG set, every test's outcome and duration, and a failure's
    traceback, go to that file the moment the test ends: a run stopped by a time
    limit (the device's calls are capped) still says which test failed and why,
    where pytest's own summary only comes at the end."""
    path = os.environ.get("MGD_TEST_LOG")
    if not path or (report.when != "call" and report.passed):
        return
    with open(path, "a", encoding="utf8") as fh:
        fh.write(f"{report.outcome:8s} {report.when:8s} {report.duration:8.2f}s {report.nodeid}\n")
        if report.failed:
            fh.write(report.longreprtext[-6000:] + "\n\n")
