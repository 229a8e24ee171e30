"""Shared by the kernel tests: interpreter switch, strict mode, hypothesis profiles, NaN-poisoning fixture,
tolerance table, error metric.

Without a GPU, Triton runs only in its interpreter, on CPU tensors, and only
if ``TRITON_INTERPRET=1`` was set before triton was imported (its own jitted functions, ``tl.cdiv``, are
decorated then) and before a kernel is built. tests/conftest.py sets it, before any test module is
collected (transformers imports triton through torch._dynamo); the ``setdefault`` here repeats it for a
process that imports this module without that conftest. The tests then force the kernel path with
``backend="triton"``.

Strict mode (``PICA_KERNELS_STRICT=1``) is set here too, before any test runs:
a kernel that fails to compile or launch must fail the test, never fall back
to the reference (the test would then compare the reference with itself).

Hypothesis profiles: ``pica-dev`` (random examples, shrinking) and, when
``CI=true``, ``pica-ci`` (derandomised: the same examples every run, no
example database, no shrinking -- a failure in CI is reported as found). The
profile is the parent of each property's settings; the example budget is set per property (an example costs 0.5-3 s under the
interpreter).

Not a conftest.py: tests elsewhere in tests/ do ``from conftest import ...``,
and a second conftest module would shadow theirs. Test modules import
``poison_kernel_outputs`` from here, which makes it autouse for them.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PICA_KERNELS_STRICT", "1")

try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # a GPU machine without hypothesis (benchmarks/gpu.sh): the property tests skip, the rest run
    settings = None

#: Parent settings of every kernel property: ``@settings(KERNEL_PROFILE, max_examples=...)``. Applied per
#: test rather than loaded globally, so hypothesis tests elsewhere keep their own profile. None without
#: hypothesis (test_kernel_properties.py then skips).
KERNEL_PROFILE = None
if settings is not None:
    _common = dict(
        deadline=None,
        # The autouse NaN-poisoning fixture is function-scoped on purpose: one patch serves every example.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )
    settings.register_profile("pica-dev", **_common)
    settings.register_profile(
        "pica-ci", derandomize=True, database=None, phases=[Phase.explicit, Phase.generate], print_blob=True,
        **_common,
    )
    KERNEL_PROFILE = settings.get_profile(
        "pica-ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "pica-dev"
    )

from pica_kernels.ops.backend import triton_available  # noqa: E402
from pica_kernels.ops.kernels import launchers  # noqa: E402

# One tolerance table per dtype (FlagGems style): the largest error allowed,
# relative to max(1, max |expected|), of a result against the float64
# reference. Inputs are O(1) and reductions run over <= a few hundred terms;
# fp16/bf16 allow a few units in the last place of the output magnitude.
TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_triton = pytest.mark.skipif(
    not triton_available(), reason="triton is not importable (pip install 'pica_kernels[triton]')"
)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach().cpu().to(torch.float64)
    expected = expected.detach().cpu().to(torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0))


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element the kernel never wrote?)"
    err = max_rel_err(actual, expected)
    assert err <= TOLERANCES[dtype], f"{what}: relative error {err:.3e} > {TOLERANCES[dtype]:.1e} for {dtype}"


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element left unwritten fails the test."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launchers, "alloc", poisoned)
