"""The multi-task launch writes each segment's rows from that segment's programs only.

On a GPU the tiles of neighbouring segments run concurrently: a program whose row mask ignored its
segment's end would write rows of the next segment (with its own task's M) in a race with that
segment's programs, giving wrong rows now and then. The interpreter runs the programs in order (a later
segment's tile overwrites the stray rows), so a plain comparison with the reference cannot see it.
Here each segment's programs are launched on their own into a NaN-poisoned output: nothing outside the
segment may change, and every row of the segment must be written.
"""

from __future__ import annotations

import types

import pytest
import torch
from kernel_helpers import DEVICE, assert_close_to_reference, needs_triton, poison_kernel_outputs  # noqa: F401

from pica_kernels import reference
from pica_kernels.ops import multitask_pica_linear
from pica_kernels.ops.kernels import launchers
from pica_kernels.ops.kernels.configs import config_override

pytestmark = needs_triton

# Positions of the integer arguments of lowrank_gemm_kernel (after its nine pointers).
ROWS, COLS, SEG_LEN, TILES_PER_SEG, NUM_ROW_TILES = 9, 10, 28, 29, 30


def _segment_of_program(pid: int, args, kw) -> int:
    """The segment program ``pid`` writes, by the kernel's tile order (_tile_coordinates)."""
    cols, tiles_per_seg, num_row_tiles = args[COLS], args[TILES_PER_SEG], args[NUM_ROW_TILES]
    width = kw["GROUP_ROWS"] * -(-cols // kw["BLOCK_COLS"])
    first = (pid // width) * kw["GROUP_ROWS"]
    group = min(num_row_tiles - first, kw["GROUP_ROWS"])
    return (first + (pid % width) % group) // tiles_per_seg


def _segment_at_a_time(monkeypatch, checked: list):
    """Route every multi-task launch through a launcher that runs one segment's programs at a time (the
    interpreter's program index remapped to that segment's programs) and checks what each one wrote."""
    from triton.runtime import interpreter

    real = launchers.kernel_module()
    builder = interpreter.interpreter_builder
    set_grid_idx, set_grid_dim = builder.set_grid_idx, builder.set_grid_dim

    def run_programs(grid, pids, args, kw):
        # The interpreter loops over range(len(pids)); the kernel sees program ids pids[...] of the full grid.
        monkeypatch.setattr(builder, "set_grid_dim", lambda x, *yz: set_grid_dim(grid[0], *yz))
        monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_grid_idx(pids[x], y, z))
        try:
            real.lowrank_gemm_kernel[(len(pids), *grid[1:])](*args, **kw)
        finally:
            monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)
            monkeypatch.setattr(builder, "set_grid_dim", set_grid_dim)

    class Segmented:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if not kw["HAS_TASKS"]:
                    return real.lowrank_gemm_kernel[grid](*args, **kw)
                out, seg_len, rows = args[6], args[SEG_LEN], args[ROWS]
                by_segment: dict[int, list[int]] = {}
                for pid in range(grid[0]):
                    by_segment.setdefault(_segment_of_program(pid, args, kw), []).append(pid)
                assert sorted(by_segment) == list(range(rows // seg_len)), "a segment without programs"
                result = torch.full_like(out, float("nan"))
                for seg, pids in by_segment.items():
                    out.fill_(float("nan"))
                    run_programs(grid, pids, args, kw)
                    inside = torch.zeros(rows, dtype=torch.bool)
                    inside[seg * seg_len:(seg + 1) * seg_len] = True
                    assert out[~inside].isnan().all(), (
                        f"segment {seg}'s programs wrote rows outside rows {seg * seg_len}..{(seg + 1) * seg_len - 1}: "
                        f"{(~out.isnan()).any(1).nonzero().flatten().tolist()}")
                    assert not out[inside].isnan().any(), f"segment {seg}'s programs left rows of it unwritten"
                    result[inside] = out[inside]
                    checked.append(seg)
                out.copy_(result)

            return launch

    monkeypatch.setattr(launchers, "kernel_module",
                        lambda: types.SimpleNamespace(INTERPRETED=real.INTERPRETED, lowrank_gemm_kernel=Segmented()))


@pytest.mark.parametrize("seq_len", [5, 20, 16])  # tiles straddling segments (5, 20), aligned (16)
def test_each_segment_is_written_by_its_own_programs_only(monkeypatch, seq_len):
    g = torch.Generator().manual_seed(0)
    nseq, in_f, out_f, rank = 5, 32, 48, 8
    x = torch.randn(nseq, seq_len, in_f, generator=g)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    bias = torch.randn(out_f, generator=g) * 0.1
    basis = torch.randn(rank, in_f, generator=g) / in_f**0.5
    m_stack = torch.randn(3, out_f, rank, generator=g)
    ids = torch.tensor([2, 0, 1, 2, 0])
    checked: list[int] = []
    _segment_at_a_time(monkeypatch, checked)
    # 16-row tiles (two per segment of 20 rows, one spilling over a segment of 5), three column tiles,
    # grouped two row tiles at a time: the programs of neighbouring segments interleave.
    with config_override(BLOCK_ROWS=16, BLOCK_COLS=16, BLOCK_DEPTH=16, GROUP_ROWS=2):
        y = multitask_pica_linear(x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), basis.to(DEVICE),
                                  m_stack.to(DEVICE), ids.to(DEVICE), backend="triton")
    assert sorted(checked) == list(range(nseq))
    f64 = torch.float64
    for i in range(nseq):
        want = reference.lowrank_linear(x[i].to(f64), weight.to(f64), bias.to(f64), m_stack[ids[i]].to(f64),
                                        basis.to(f64))
        assert_close_to_reference(y[i].cpu(), want, torch.float32, f"y[{i}]")
