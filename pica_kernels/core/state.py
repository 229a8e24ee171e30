"""A model's adapter state: one immutable value per model, changed only by whole transactions.

:class:`AdapterState` says which adapters exist, which are active, which are merged and in what order, and whether
the adapters are disabled. One :class:`StateCell` per model holds it (the model-level bank holds the cell:
``model.pica_bank`` natively, the tuner's ``pica_M`` under PEFT); every PiCa layer of the model reads the value
through its reference to the bank and keeps none of it itself (it knows only which adapters cover it, with their
side, rank and group). Nothing but :func:`transaction` replaces the value.

A transaction (every model-level operation: add, set, merge, unmerge, disable/enable, delete, load,
merge_and_unload) takes the cell's write lock, computes the next value whole, validates it, publishes it, edits the
layers, and on any exception (``KeyboardInterrupt`` included) restores the previous value and every parameter,
buffer, flag, attribute container, ``requires_grad`` and the module tree exactly as they were.

A request's selection (a mixed batch's ``adapter_names``, a per-call disable) travels in the :data:`_SELECTION`
context variable, never on shared modules: two threads or asyncio tasks serving different selections do not see
each other's. A forward holds the cell's read lock for its whole duration (taken once by the model's top-level
forward, see :class:`ForwardScope`, or by a layer called on its own), so a forward sees one state in every layer,
never half of a switch; writers wait for forwards in flight to finish and new forwards wait for a waiting writer.
See docs/design.md ("Adapter state") for what may run concurrently.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import PiCaError

__all__ = [
    "AdapterState",
    "AdapterStateError",
    "ForwardScope",
    "Selection",
    "Snapshot",
    "StateCell",
    "current_selection",
    "request",
    "install_forward_scope",
    "transaction",
    "uninstall_forward_scope",
]


class AdapterStateError(PiCaError, RuntimeError):
    """An adapter operation that the model's current adapter state does not allow (nothing was changed)."""


@dataclass(frozen=True)
class AdapterState:
    """The adapter state of a model (immutable; replaced whole).

    adapters: the adapters the model has, in the order they were added.
    active: the active adapters (the native front end has at most one; PEFT may have several).
    merged: the adapters merged into the base weights, in merge order (a stack: ``W0 + ΔW_a + ΔW_b``).
    disabled: every layer gives its base output (exactly, also while merged).
    """

    adapters: tuple[str, ...] = ()
    active: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()
    disabled: bool = False

    def evolve(self, **changes) -> AdapterState:
        """A new, validated state with ``changes`` applied (lists are turned into tuples)."""
        changes = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in changes.items()}
        return replace(self, **changes).validated()

    def validated(self) -> AdapterState:
        for fld in ("adapters", "active", "merged"):
            names = getattr(self, fld)
            if len(set(names)) != len(names):
                raise AdapterStateError(f"adapter state: {fld} {list(names)} names an adapter twice")
        for fld in ("active", "merged"):
            unknown = [n for n in getattr(self, fld) if n not in self.adapters]
            if unknown:
                raise AdapterStateError(f"adapter state: {fld} names {unknown}, the model has {list(self.adapters)}")
        return self

    def merged_on(self, layer_adapters: Iterable[str]) -> list[str]:
        """The merged stack of a layer covered by ``layer_adapters`` (in merge order)."""
        have = set(layer_adapters)
        return [a for a in self.merged if a in have]


class _RWLock:
    """Readers (forwards) share it; a writer (a transaction) holds it alone, reentrantly, and may read.

    Writer-preferring: once a writer waits, new readers wait too, so a stream of forwards cannot starve a switch.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._depth = 0
        self._waiting = 0

    def acquire_read(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                while self._writer is not None or self._waiting:
                    self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
                return
            self._waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer, self._depth = me, 1

    def release_write(self) -> None:
        with self._cond:
            self._depth -= 1
            if not self._depth:
                self._writer = None
                self._cond.notify_all()

    def owned(self) -> bool:
        return self._writer == threading.get_ident()


#: ids of the cells whose read lock the current context holds (a forward in flight).
_READING: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("pica_reading", default=frozenset())


@dataclass(frozen=True)
class Selection:
    """A request's selection on one model: one adapter per sequence (``names``) and/or the base output only."""

    names: tuple[str, ...] | None = None
    disabled: bool = False


#: {id(cell): Selection} of the current context (a thread, an asyncio task); replaced, never mutated.
_SELECTION: contextvars.ContextVar[dict[int, Selection] | None] = contextvars.ContextVar("pica_selection",
                                                                                        default=None)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class StateCell:
    """Holds a model's :class:`AdapterState` and its lock (a plain object the bank refers to; copies and pickles
    drop the lock and make a new one)."""

    def __init__(self, value: AdapterState | None = None) -> None:
        self.value = value or AdapterState()
        self._lock = _RWLock()

    def __getstate__(self) -> dict:
        return {"value": self.value}

    def __setstate__(self, state: dict) -> None:
        self.value = state["value"]
        self._lock = _RWLock()

    # --------------------------------------------------------------- readers
    def reading_here(self) -> bool:
        return id(self) in _READING.get()

    def acquire_forward(self) -> contextvars.Token | None:
        """Take the read lock for a forward unless this context holds it (a nested call) or a writer of this
        thread does; returns what :meth:`release_forward` needs."""
        if _compiling() or self.reading_here():
            return None
        self._lock.acquire_read()
        try:
            return _READING.set(_READING.get() | {id(self)})
        except BaseException:
            self._lock.release_read()
            raise

    def release_forward(self, token: contextvars.Token | None) -> None:
        if token is None:
            return
        _READING.reset(token)
        self._lock.release_read()

    @contextlib.contextmanager
    def forward(self) -> Iterator[AdapterState]:
        """The state a forward (or a reader such as save) uses, with the read lock held for the block."""
        token = self.acquire_forward()
        try:
            yield self.value
        finally:
            self.release_forward(token)

    # --------------------------------------------------------------- writers
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        if _compiling():
            raise AdapterStateError("adapter state cannot change inside torch.compile")
        if self.reading_here() and not self._lock.owned():
            raise AdapterStateError(
                "cannot change this model's adapters from inside its own forward (the forward holds the state "
                "it started with); change them before or after the forward")
        self._lock.acquire_write()
        try:
            yield
        finally:
            self._lock.release_write()

    def in_transaction(self) -> bool:
        """True in the thread of a transaction in progress on this cell."""
        return self._lock.owned()


# --------------------------------------------------------------------- selection
def current_selection(cell: StateCell) -> Selection | None:
    """This context's selection on ``cell``'s model (None: the model's state alone)."""
    if _compiling():
        return None
    selections = _SELECTION.get()
    return None if selections is None else selections.get(id(cell))


def forward_view(cell: StateCell, names: Sequence[str] | None) -> tuple[AdapterState, list[str] | None, bool]:
    """What one layer forward serves, read once: the model's state, the adapter name per sequence (the call's own
    ``names``, else this context's selection, else None) and whether the adapters are off for it (the model's
    state or this context's request)."""
    state = cell.value
    sel = current_selection(cell)
    if names is None and sel is not None and sel.names is not None:
        names = sel.names
    return state, None if names is None else list(names), state.disabled or (sel is not None and sel.disabled)


@contextlib.contextmanager
def request(cells: Iterable[StateCell], *, names: list[str] | None = None, disabled: bool = False) -> Iterator[None]:
    """Within the block, in this context only, the forwards of ``cells``' models use this selection."""
    current = dict(_SELECTION.get() or {})
    sel = Selection(None if names is None else tuple(names), disabled)
    for cell in cells:
        prev = current.get(id(cell))
        if prev is not None:  # nested: a disable inside a mixed batch keeps the names and vice versa
            sel_c = Selection(sel.names if sel.names is not None else prev.names, sel.disabled or prev.disabled)
        else:
            sel_c = sel
        current[id(cell)] = sel_c
    token = _SELECTION.set(current)
    try:
        yield
    finally:
        _SELECTION.reset(token)


class ForwardScope:
    """A model's top-level forward pre-hook and (always-called) forward hook: the forward holds the read lock of
    the model's state for its whole duration, so every layer sees one state. Registered once per model on its root;
    a deep copy of the model copies the scope with its cell."""

    def __init__(self, cell: StateCell) -> None:
        self.cell = cell
        self._tokens = threading.local()

    def __getstate__(self) -> dict:
        return {"cell": self.cell}

    def __setstate__(self, state: dict) -> None:
        self.cell = state["cell"]
        self._tokens = threading.local()

    def _stack(self) -> list:
        stack = getattr(self._tokens, "stack", None)
        if stack is None:
            stack = self._tokens.stack = []
        return stack

    def pre(self, module, args):
        if not _compiling():
            self._stack().append(self.cell.acquire_forward())

    def post(self, module, args, output):
        if not _compiling():
            stack = self._stack()
            if stack:
                self.cell.release_forward(stack.pop())


def install_forward_scope(root: nn.Module, cell: StateCell) -> None:
    """Register :class:`ForwardScope` hooks of ``cell`` on ``root`` (once)."""
    for hook in root._forward_pre_hooks.values():
        if getattr(hook, "__self__", None) is not None and isinstance(hook.__self__, ForwardScope) \
                and hook.__self__.cell is cell:
            return
    scope = ForwardScope(cell)
    root.register_forward_pre_hook(scope.pre, prepend=True)
    root.register_forward_hook(scope.post, always_call=True)


def uninstall_forward_scope(root: nn.Module) -> None:
    """Remove the :class:`ForwardScope` hooks from ``root`` (the model no longer has PiCa layers)."""
    for hooks in (root._forward_pre_hooks, root._forward_hooks):
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), ForwardScope):
                del hooks[key]
                root._forward_hooks_always_called.pop(key, None)


# --------------------------------------------------------------------- transactions
_CONTAINERS = (dict, list, set)


@dataclass
class Snapshot:
    """Everything a transaction may change, recorded without copying a tensor: every module's attribute
    containers (parameters, buffers, submodules, hooks, per-adapter dicts) as shallow copies restored in place,
    every parameter's and buffer's ``requires_grad`` and storage, and the cell's value."""

    cell: StateCell | None
    value: AdapterState | None
    modules: list[tuple[nn.Module, dict, dict]] = field(default_factory=list)
    tensors: list[tuple[torch.Tensor, bool, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def take(cls, cell: StateCell | None, roots: Iterable[nn.Module], *, data: bool = True) -> Snapshot:
        """``data=False``: record each tensor's ``requires_grad`` but not its storage (a snapshot kept for long
        must not keep storages alive that a later ``.to()`` replaced)."""
        snap = cls(cell, cell.value if cell is not None else None)
        seen: set[int] = set()
        tensors: dict[int, torch.Tensor] = {}
        for root in roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                attrs = dict(module.__dict__)
                contents = {k: (type(v), v.copy()) for k, v in attrs.items() if type(v) in _CONTAINERS
                            or isinstance(v, dict)}
                snap.modules.append((module, attrs, contents))
                for t in [*module._parameters.values(), *module._buffers.values()]:
                    if t is not None:
                        tensors[id(t)] = t
        snap.tensors = [(t, t.requires_grad, t.data if data else None) for t in tensors.values()]
        return snap

    def attrs_of(self, module: nn.Module) -> dict:
        """``module``'s attributes as recorded (containers as their recorded contents); {} if not recorded."""
        for m, attrs, contents in self.modules:
            if m is module:
                return {k: contents[k][1] if k in contents else v for k, v in attrs.items()}
        return {}

    def restore(self) -> None:
        for module, attrs, contents in self.modules:
            for k, (_, saved) in contents.items():
                obj = attrs[k]
                obj.clear()
                if isinstance(obj, dict):
                    obj.update(saved)
                elif isinstance(obj, list):
                    obj.extend(saved)
                else:
                    obj.update(saved)
            module.__dict__.clear()
            module.__dict__.update(attrs)
        with torch.no_grad():
            for t, flag, data in self.tensors:
                if data is not None and not _same_storage(t, data):
                    t.data = data
                if t.requires_grad != flag:
                    t.requires_grad_(flag)
        if self.cell is not None:
            self.cell.value = self.value


def _same_storage(t: torch.Tensor, data: torch.Tensor) -> bool:
    if t.dtype != data.dtype or t.shape != data.shape:
        return False
    try:
        return t.data_ptr() == data.data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper tensor subclass without storage of its own
        return True


class Transaction:
    """One model-level operation in progress (see :func:`transaction`)."""

    def __init__(self, cell: StateCell | None, snapshot: Snapshot) -> None:
        self.cell = cell
        self._snapshot = snapshot
        self._undo: list[Callable[[], None]] = []

    @property
    def before(self) -> AdapterState:
        return self._snapshot.value

    def publish(self, state: AdapterState) -> None:
        """Make ``state`` (validated) the model's state; forwards cannot observe it before the transaction ends."""
        assert self.cell is not None
        self.cell.value = state.validated()

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Register ``undo`` (run in reverse order, before the structural restore) for a change made in place to a
        tensor's values (a merge into a weight, M values copied in on load)."""
        self._undo.append(undo)

    def keep(self, tensor: torch.Tensor) -> None:
        """Keep a copy of ``tensor``'s values, put back on rollback (for in-place value changes)."""
        saved = tensor.detach().clone()

        def undo(t=tensor, v=saved):
            with torch.no_grad():
                t.data.copy_(v)

        self._undo.append(undo)

    def rollback(self) -> None:
        with torch.no_grad():  # an undo recomputes merged weights from M, which requires grad
            for undo in reversed(self._undo):
                undo()
        self._snapshot.restore()


@contextlib.contextmanager
def transaction(cell: StateCell | None, roots: Iterable[nn.Module]) -> Iterator[Transaction]:
    """Run one model-level operation on the model(s) ``roots`` whose state ``cell`` holds: the block computes and
    validates the next state before touching a layer, publishes it (:meth:`Transaction.publish`) and edits the
    layers. On any exception, ``KeyboardInterrupt`` included, everything is put back exactly and the exception
    propagates. ``cell`` None: a model without PiCa state yet (the first ``apply_pica``)."""
    roots = list(roots)
    lock = cell.writing() if cell is not None else contextlib.nullcontext()
    with lock:
        txn = Transaction(cell, Snapshot.take(cell, roots))
        try:
            yield txn
        except BaseException:
            txn.rollback()
            raise
