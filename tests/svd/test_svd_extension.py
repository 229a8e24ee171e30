"""Backend probing (pica_kernels/svd/extension.py): which implementation of the SVD core runs."""

from __future__ import annotations

import os

from pica_kernels import svd as svd_mod


def test_backend_reported(monkeypatch):
    assert svd_mod.backend() == ("cpp" if svd_mod.HAS_CPP else "torch")
    assert (svd_mod.backend_error() is None) == svd_mod.HAS_CPP
    monkeypatch.setenv("PICA_SVD_BACKEND", "torch")
    assert svd_mod.backend() == "torch"
    if os.environ.get("PICA_REQUIRE_CPP"):
        assert svd_mod.HAS_CPP

