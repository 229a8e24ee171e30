"""Serving concurrently: a request's selection never leaks to other threads or asyncio tasks, and a forward never
sees half of an adapter switch (docs/design.md "Adapter state", what may run concurrently).

The interleavings are forced with events, not left to the scheduler, so each test checks the same interleaving on
every run (the one case that waits with a timeout checks a result that does not depend on how long it waits).
"""

from __future__ import annotations

import asyncio
import threading

import torch
from torch import nn

import pica_kernels as pk


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def _model():
    model = TwoLayer()
    for name in ("A", "B"):
        pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules=["q_proj", "v_proj"]), adapter_name=name,
                      progress=False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.pica_bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _outputs(model):
    with torch.no_grad():
        y_a = model(X)
        pk.set_adapter(model, "B")
        y_b = model(X)
        pk.set_adapter(model, "A")
        with pk.disable_adapter(model):
            y_0 = model(X)
    assert not torch.equal(y_a, y_b) and not torch.equal(y_a, y_0)
    return y_a, y_b, y_0


def _run_beside(model, request):
    """Thread 1 enters ``request`` (a context manager factory) and waits; meanwhile this thread runs a plain forward;
    then thread 1 runs its forward inside the request. Returns (plain output, request output)."""
    entered, done, out = threading.Event(), threading.Event(), {}

    def serve():
        with torch.no_grad(), request():
            entered.set()
            done.wait()
            out["request"] = model(X)

    t = threading.Thread(target=serve)
    t.start()
    entered.wait()
    with torch.no_grad():
        plain = model(X)
    done.set()
    t.join()
    return plain, out["request"]


def test_mixed_batch_in_one_thread_does_not_leak_into_plain_forwards_of_another():
    model = _model()
    y_a, y_b, _ = _outputs(model)
    plain, mixed = _run_beside(model, lambda: pk.mixed_batch(model, ["B", "B"]))
    assert torch.equal(plain, y_a)  # the other thread's selection is not this one's
    torch.testing.assert_close(mixed, y_b, atol=1e-6, rtol=1e-6)  # and the request got its own


def test_disable_adapter_in_one_thread_does_not_leak_into_another():
    model = _model()
    y_a, _, y_0 = _outputs(model)
    plain, disabled = _run_beside(model, lambda: pk.disable_adapter(model))
    assert torch.equal(plain, y_a)
    assert torch.equal(disabled, y_0)


def test_asyncio_tasks_keep_their_own_selection():
    model = _model()
    y_a, y_b, y_0 = _outputs(model)

    async def serve(selection, entered, go, finished):
        with selection():  # (no_grad only around the forward: grad mode is per thread, not per task)
            entered.set()
            await go.wait()  # the other task runs while this one is inside its selection
            with torch.no_grad():
                y = model(X)
            finished.set()
            return y

    async def main():
        a_in, b_in, a_done, never = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        never.set()
        # Task 1 computes while task 2 is inside its own selection (task 2 waits for task 1 to finish).
        t1 = asyncio.create_task(serve(lambda: pk.mixed_batch(model, ["B", "B"]), a_in, b_in, a_done))
        t2 = asyncio.create_task(serve(lambda: pk.disable_adapter(model), b_in, a_done, never))
        return await asyncio.gather(t1, t2)

    mixed, disabled = asyncio.run(main())
    torch.testing.assert_close(mixed, y_b, atol=1e-6, rtol=1e-6)
    assert torch.equal(disabled, y_0)
    with torch.no_grad():
        assert torch.equal(model(X), y_a)


def test_a_forward_never_sees_half_of_a_set_adapter():
    """Thread 2 switches A -> B while thread 1's forward is between its two layers. Before, the switch went through
    and the forward finished with q_proj on A and v_proj on B; now the switch waits for the forward in flight."""
    model = _model()
    y_a, y_b, _ = _outputs(model)
    between, switched = threading.Event(), threading.Event()

    def pause_between_layers(module, args):
        between.set()
        switched.wait(timeout=2.0)  # the switch cannot finish while this forward runs: the wait runs out

    handle = model.v_proj.register_forward_pre_hook(pause_between_layers)

    def switch():
        between.wait()
        pk.set_adapter(model, "B")
        switched.set()

    t = threading.Thread(target=switch)
    t.start()
    with torch.no_grad():
        y = model(X)
    t.join()
    handle.remove()
    assert torch.equal(y, y_a)  # the state the forward started with, in both layers
    with torch.no_grad():
        assert torch.equal(model(X), y_b)  # and the switch happened after it


def test_set_adapter_beside_forwards_gives_only_whole_outputs():
    model = _model()
    y_a, y_b, _ = _outputs(model)
    stop, outs, errors = threading.Event(), [], []

    def forwards():
        try:
            with torch.no_grad():
                while not stop.is_set() or len(outs) < 30:
                    outs.append(model(X))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def slow_v(module, args):
        threading.Event().wait(0.0005)  # widen the window between the two layers

    handle = model.v_proj.register_forward_pre_hook(slow_v)
    t = threading.Thread(target=forwards)
    t.start()
    for i in range(30):
        pk.set_adapter(model, "B" if i % 2 == 0 else "A")
    stop.set()
    t.join()
    handle.remove()
    assert not errors
    torn = [y for y in outs if not (torch.equal(y, y_a) or torch.equal(y, y_b))]
    assert not torn, f"{len(torn)} of {len(outs)} forwards mixed A and B"


def test_peft_adapter_names_in_one_thread_does_not_leak_into_another():
    from conftest import tiny_model
    from peft import get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4))
    model.add_adapter("other", PiCaPeftConfig(r=4))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.base_model.pica_M.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_default = model(input_ids=ids).logits
        y_other = model(input_ids=ids, adapter_names=["other", "other"]).logits
    assert not torch.allclose(y_default, y_other)
    entered, done, out = threading.Event(), threading.Event(), {}

    def pause(module, args, kwargs):
        entered.set()
        done.wait()

    # Thread 1 stops inside its mixed-batch forward (after the selection was made) while thread 2 runs a plain one.
    layer = model.base_model.model.model.layers[2].mlp.down_proj
    handle = layer.register_forward_pre_hook(pause, with_kwargs=True)

    def serve():
        with torch.no_grad():
            out["mixed"] = model(input_ids=ids, adapter_names=["other", "other"]).logits

    t = threading.Thread(target=serve)
    t.start()
    entered.wait()
    handle.remove()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    done.set()
    t.join()
    assert torch.equal(plain, y_default)
    assert torch.equal(out["mixed"], y_other)
