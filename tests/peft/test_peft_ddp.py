"""DDP (gloo, 2 CPU processes) with a shared M: gradients and updated M equal a single-process run."""

from __future__ import annotations

import os
import socket

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


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids = _batch().chunk(world)[rank]  # each rank its half of the global batch
        grads, updated = _step(model, ddp, ids)
        if rank == 0:
            torch.save({"grads": grads, "updated": updated}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_shared_m_matches_single_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    model = _model()
    grads, updated = _step(model, model, _batch())  # the same global batch in one process
    assert set(got["grads"]) == set(grads) and len(grads) == 5
    for key in grads:
        assert grads[key].abs().sum() > 0
        torch.testing.assert_close(got["grads"][key], grads[key], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["updated"][key], updated[key], atol=1e-7, rtol=1e-6)
