"""Every csrc/*.cu compiles with a bare nvcc (CI check; no GPU or CUDA torch needed).

The .cu files include only <cuda_runtime.h>-level headers for this reason; the
ATen/CUDA glue lives in csrc/svd_cuda.cpp, built only with a CUDA torch.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def test_there_are_cu_files():
    assert CU_FILES, f"no .cu files under {CSRC}"


@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_with_nvcc(cu, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    res = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, f"nvcc failed on {cu.name}:\n{res.stderr[-4000:]}"
    assert (tmp_path / (cu.stem + ".o")).stat().st_size > 0
