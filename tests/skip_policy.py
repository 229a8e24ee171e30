"""Under ``CI=true`` a skipped test is a failure, unless it carries ``@pytest.mark.gpu``.

A missing triton, an unbuilt C++ extension or a missing real model would otherwise skip the tests that
need them and leave a green run that tested nothing; on a CI machine they are installed by ``make test``,
so their absence is a broken install. GPU-only tests are the one exception: CI machines have no GPU.
``tests/conftest.py`` imports these hooks; ``tests/test_skip_policy.py`` checks them in an inner pytest run.
"""

from __future__ import annotations

import os

import pytest

GPU_MARKER = "gpu: GPU-only test; the only skip allowed under CI=true (give the reason in the skip)"


def ci_enabled() -> bool:
    """True when the environment variable CI says so (``true``, ``1`` or ``yes``, any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", GPU_MARKER)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    # xfail reports also count as skipped; they carry `wasxfail` and are not skips of a missing dependency.
    if not (report.skipped and ci_enabled()) or hasattr(report, "wasxfail") or item.get_closest_marker("gpu"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, where only tests marked @pytest.mark.gpu may skip: {reason}\n"
                       "(install what the test needs, or mark a GPU-only test @pytest.mark.gpu)")
