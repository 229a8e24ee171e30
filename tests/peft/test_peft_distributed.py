"""DDP and FSDP2 (gloo, 2 CPU processes) with a shared M: gradients and updated M equal a single-process run.

FSDP2 (``fully_shard``) wraps every decoder layer and then the root: the shared M
live on the PEFT tuner, outside the decoder layers, so they belong to the root
group (unsharded for the whole forward and backward, reduce-scattered once);
no "parameter shared with another FSDP group" problem arises.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from peft import get_peft_model

from pica_kernels.peft import PiCaPeftConfig

LR = 0.1


def _model():
    model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.base_model.pica_M["default"].values():
            m.copy_(torch.randn(m.shape, generator=gen) * 0.05)
    return model


def _batch():
    return torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(1))


def _step(model, forward, ids):
    """One SGD step; returns ({group: grad}, {group: updated M})."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    forward(input_ids=ids, labels=ids).loss.backward()
    store = model.base_model.pica_M["default"]
    grads = {k: m.grad.detach().clone() for k, m in store.items()}
    opt.step()
    return grads, {k: m.detach().clone() for k, m in store.items()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: DDP then FSDP2 steps on half of the global batch; results to ``out_dir/rank{rank}.pt``.

    Leaves with ``os._exit``: gloo's worker threads can still be alive while the interpreter shuts down,
    and a normal exit then aborts the rank now and then ("terminate called without an active exception",
    SIGABRT; about one run in four measured). ``os._exit`` runs no interpreter shutdown at all; the parent
    judges the rank by its exit code and the file it wrote, never by the absence of a crash at exit.
    """
    code = 1
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        ids = _batch().chunk(world)[rank]  # each rank its half of the global batch
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        results = {"ddp": _step(model, ddp, ids)}

        from torch.distributed.fsdp import fully_shard

        model = _model()
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        grads, updated = _step(model, model, ids)
        # M are DTensors sharded over the 2 ranks: gather them to compare with the single-process run.
        results["fsdp2"] = ({k: g.full_tensor() for k, g in grads.items()},
                            {k: m.full_tensor() for k, m in updated.items()})
        tmp = os.path.join(out_dir, f"rank{rank}.pt.tmp")
        torch.save(results, tmp)
        os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))  # a file that exists is complete
        # Both ranks reach here before either tears gloo down, so neither leaves while its peer still talks.
        dist.barrier()
        dist.destroy_process_group()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, out_dir: Path, timeout: float = 420.0) -> None:
    """Start ``world`` ranks, wait for them, and fail with every rank's exit code unless all exited 0.

    ``timeout`` only catches a hang: a rank takes ~10 s alone, minutes on a loaded shared 2-core machine.
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world, port, str(out_dir))) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    assert not hung and codes == [0] * world, f"ranks still running after {timeout} s: {hung}; exit codes {codes}"


def test_ddp_and_fsdp2_two_processes_shared_m_match_single_process(tmp_path):
    _run_ranks(2, tmp_path)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    model = _model()
    grads, updated = _step(model, model, _batch())  # the same global batch in one process
    assert len(grads) == 5 and all(g.abs().sum() > 0 for g in grads.values())
    for rank, results in enumerate(per_rank):
        for kind in ("ddp", "fsdp2"):
            got_grads, got_updated = results[kind]
            assert set(got_grads) == set(grads), kind
            for key in grads:
                msg = f"rank {rank} {kind} {key}"
                torch.testing.assert_close(got_grads[key], grads[key], atol=1e-6, rtol=1e-5, msg=msg)
                torch.testing.assert_close(got_updated[key], updated[key], atol=1e-7, rtol=1e-6, msg=msg)
