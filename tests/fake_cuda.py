"""A CPU stand-in for the torch.cuda pieces the lean runtime uses (streams, events, CUDA
graphs), so that its GPU-only code paths run, and are compared, on CPU tensors.

What it models: CPU work is synchronous, so a stream is an ordering, not a queue. Each
stream carries a vector clock; recording an event, waiting on an event or a stream, and
host synchronisation move the clocks as CUDA's ordering rules do. With `race_check()` on,
every aten op is tagged with the current stream and its clock, and an access to a
tensor's storage that conflicts (one of the two a write) with an access on another
stream that it is not ordered after raises `StreamRace`: the hazard a GPU would turn into
wrong values some of the time. A wait on an event that was never recorded raises too (on
a GPU it would silently not wait).

A "CUDA graph" records the aten ops run inside `torch.cuda.graph(...)` and replays exactly
those ops on the same tensors, writing each result back into the tensor the capture made:
fixed memory, fixed op sequence, Python not re-run, as on a GPU; a replay raises if a
tensor it reads was moved to other memory since the capture (a real graph would read the
stale address). An op that reads device memory on the host (`.item()`, `nonzero`) inside
a capture raises, as a real capture fails. Not modelled: Triton kernels (not aten ops, so not recorded or checked: keep them
off here), the caching allocator's per-stream memory reuse.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class StreamRace(AssertionError):
    """Two accesses to one tensor on different streams, at least one a write, unordered."""


def _merge(a: dict[int, int], b: dict[int, int]) -> None:
    for k, v in b.items():
        if a.get(k, 0) < v:
            a[k] = v


class FakeEvent:
    def __init__(self, enable_timing: bool = False, **_: Any):
        self.vc: dict[int, int] | None = None

    def record(self, stream: "FakeStream | None" = None) -> None:
        stream = stream if stream is not None else FakeCuda.active.current
        self.vc = dict(stream.vc)

    def query(self) -> bool:
        # Pessimistic: recorded work is never seen complete before a synchronize (a slow
        # GPU), so that the host's polling cannot order the streams and hide a race.
        return self.vc is None  # CUDA: an event never recorded counts as complete

    def synchronize(self) -> None:
        assert self.vc is not None, "synchronize() on an event that was never recorded"
        _merge(FakeCuda.active.host, self.vc)

    def elapsed_time(self, end: "FakeEvent") -> float:
        return 0.0


class FakeStream:
    _ids = 0

    def __init__(self, device: Any = None, priority: int = 0):
        FakeStream._ids += 1
        self.id = FakeStream._ids
        self.vc: dict[int, int] = {self.id: 0}

    def tick(self, host: dict[int, int]) -> int:
        _merge(self.vc, host)
        self.vc[self.id] += 1
        return self.vc[self.id]

    def wait_stream(self, other: "FakeStream") -> None:
        _merge(self.vc, other.vc)

    def wait_event(self, event: FakeEvent) -> None:
        assert event.vc is not None, "wait_event() on an event never recorded: on a GPU this would not wait"
        _merge(self.vc, event.vc)

    def synchronize(self) -> None:
        _merge(FakeCuda.active.host, self.vc)


class _RaceDetector(TorchDispatchMode):
    def __init__(self, fake: "FakeCuda") -> None:
        super().__init__()
        self.fake = fake
        self.history: dict[int, list[tuple[int, int, bool, str]]] = {}  # storage -> (stream, tick, write, op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stream = self.fake.current
        tick = stream.tick(self.fake.host)
        reads, writes = [], []
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written = arg.alias_info is not None and arg.alias_info.is_write
            (writes if written else reads).extend(_tensors(value))
        inputs = {_storage(t) for t in reads + writes}
        out = func(*args, **kwargs)
        name = str(func)
        for t in reads:
            self._access(t, stream, tick, False, name)
        for t in writes:
            self._access(t, stream, tick, True, name)
        for t in _tensors(out):
            if _storage(t) not in inputs and _storage(t):  # a new allocation starts a new history
                self.history[_storage(t)] = [(stream.id, tick, True, name)]
        return out

    def _access(self, t: torch.Tensor, stream: FakeStream, tick: int, write: bool, name: str) -> None:
        key = _storage(t)
        if not key:
            return
        past = self.history.setdefault(key, [])
        for other, when, was_write, other_name in past:
            if other != stream.id and (write or was_write) and stream.vc.get(other, 0) < when:
                raise StreamRace(
                    f"{name} ({'write' if write else 'read'} on stream {stream.id}) is not ordered after "
                    f"{other_name} ({'write' if was_write else 'read'} on stream {other}) of the same tensor"
                )
        if write:
            past.clear()
        past.append((stream.id, tick, write, name))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else 0


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise AssertionError(f"host read of device memory inside a CUDA graph capture: {func}")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out, [t.data_ptr() for t in _tensors((args, kwargs))]))
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


class FakeCUDAGraph:
    def __init__(self) -> None:
        self.ops: list[tuple] | None = None
        self.replays = 0

    def replay(self) -> None:
        assert self.ops is not None, "replay() before capture"
        for func, args, kwargs, out, ptrs in self.ops:
            moved = [t for t, p in zip(_tensors((args, kwargs)), ptrs) if t.data_ptr() != p]
            if moved:  # a real graph keeps reading the captured address
                raise AssertionError(f"{func}: a tensor the graph reads moved since capture: {tuple(moved[0].shape)}")
            new = func(*args, **kwargs)
            for old, fresh in zip(_tensors(out), _tensors(new)):
                # views and in-place results already live in the captured memory
                if fresh.untyped_storage().data_ptr() != old.untyped_storage().data_ptr():
                    old.copy_(fresh)
        self.replays += 1


class FakeCuda:
    """Installs the stand-ins on torch.cuda for the duration of a test (monkeypatch)."""

    active: "FakeCuda"

    def __init__(self, monkeypatch: Any):
        FakeCuda.active = self
        self.default = FakeStream()
        self.current = self.default
        self.host: dict[int, int] = {}
        self.graphs: list[FakeCUDAGraph] = []
        self.streams: list[FakeStream] = [self.default]
        fake = self

        def new_stream(*args: Any, **kwargs: Any) -> FakeStream:
            s = FakeStream(*args, **kwargs)
            fake.streams.append(s)
            return s

        def new_graph() -> FakeCUDAGraph:
            g = FakeCUDAGraph()
            fake.graphs.append(g)
            return g

        @contextmanager
        def stream(s: FakeStream) -> Iterator[None]:
            before, fake.current = fake.current, s
            try:
                yield
            finally:
                fake.current = before

        @contextmanager
        def graph(g: FakeCUDAGraph, *args: Any, **kwargs: Any) -> Iterator[None]:
            fake.synchronize()  # torch.cuda.graph synchronises the device before capturing
            recorder = _Recorder()
            with recorder:
                yield
            g.ops = recorder.ops

        for name, value in (("Stream", new_stream), ("Event", FakeEvent), ("CUDAGraph", new_graph),
                            ("current_stream", lambda device=None: fake.current), ("stream", stream),
                            ("graph", graph), ("synchronize", lambda device=None: fake.synchronize())):
            monkeypatch.setattr(torch.cuda, name, value)

    def synchronize(self) -> None:
        for s in self.streams:
            _merge(self.host, s.vc)

    @contextmanager
    def race_check(self) -> Iterator[None]:
        """Every aten op inside is checked against the accesses of other streams."""
        with _RaceDetector(self):
            yield
