"""The CI skip policy (tests/skip_policy.py): under CI=true a skip fails unless the test is marked gpu."""

from __future__ import annotations

import pytest

INNER_TESTS = """
import pytest

def test_plain_skip():
    pytest.skip("triton is not importable")

@pytest.mark.skipif(True, reason="C++ extension not built")
def test_skipif():
    pass

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_gpu_only():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
"""


@pytest.fixture
def inner(pytester):
    pytester.makeconftest("from skip_policy import pytest_configure, pytest_runtest_makereport  # noqa: F401\n")
    pytester.makepyfile(test_inner=INNER_TESTS)
    return pytester


@pytest.mark.parametrize("ci", ["TRUE", "1"])
def test_skips_fail_under_ci_except_gpu_tests(inner, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    result = inner.runpytest("-p", "no:cacheprovider", "-rA", "--strict-markers")
    # Skips raised in setup (skipif) are reported as errors, in the call (pytest.skip) as failures.
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1, xfailed=1)
    for line in ("FAILED*test_plain_skip*skipped under CI=true*triton is not importable*",
                 "ERROR*test_skipif*skipped under CI=true*C++ extension not built*", "SKIPPED*needs a CUDA GPU*"):
        result.stdout.fnmatch_lines([line])


@pytest.mark.parametrize("ci", [None, "false"])
def test_skips_stay_skips_outside_ci(inner, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    inner.runpytest("-p", "no:cacheprovider", "--strict-markers").assert_outcomes(passed=1, skipped=3, xfailed=1)
