"""The ranks ``mlx.launch`` starts: which one this process is, its share of a list of work, and
gathering every rank's results (JSON values) back in the list's order.

A plain process is rank 0 of 1: :func:`shard` returns the whole list and :func:`gather_shards`
its results, without touching MLX. Under ``mlx.launch`` (:func:`launched`) every rank must make
the same collective calls in the same order (:func:`gather`, :func:`barrier`); when a rank stops,
the others' next collective fails (:func:`peer_lost`)."""

from __future__ import annotations

import json
import os
from typing import Callable, TypeVar

from tracer.errors import PeerLost

T = TypeVar("T")


def launched() -> bool:
    """Whether ``mlx.launch`` started this process, read from the environment it sets (no MLX
    loaded): ``MLX_RANK`` (every backend it starts processes for itself; ring sets nothing else)
    or ``MLX_WORLD_SIZE`` (NCCL)."""
    return "MLX_RANK" in os.environ or int(os.environ.get("MLX_WORLD_SIZE", "1")) > 1


def peer_lost(exc: BaseException | None) -> bool:
    """Whether ``exc`` says another rank stopped: the ring backend's error from a collective whose
    peer is gone (it exited or was killed), or the :class:`PeerLost` training turned it into."""
    return isinstance(exc, PeerLost) or (isinstance(exc, RuntimeError)
                                         and "[ring] connection to a peer was lost" in str(exc))


def world() -> tuple[int, int]:
    """``(rank, size)`` of this process's group; ``(0, 1)`` in a plain process."""
    if not launched():
        return 0, 1
    import mlx.core as mx

    group = mx.distributed.init()
    return group.rank(), group.size()


def shard(items: list[T]) -> list[T]:
    """This rank's share of ``items``: every size-th one from its rank (strided, so ranks get
    items from all over the list)."""
    rank, size = world()
    return items[rank::size]


def unshard(parts: list[list[T]]) -> list[T]:
    """The list whose :func:`shard` s were ``parts`` (one per rank, in rank order)."""
    out: list[T] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def gather(values: list) -> list[list]:
    """Every rank's ``values`` (a list of JSON values), in rank order, on every rank. Each rank's
    list travels as its JSON text (bytes), padded to the longest one."""
    _, size = world()
    if size == 1:
        return [values]
    import mlx.core as mx
    import numpy as np

    data = json.dumps(values).encode()  # ASCII escapes: any str, lone surrogates too, comes back as it was
    lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), stream=mx.cpu).tolist()
    longest = max(lengths)
    mine = mx.array(np.frombuffer(data.ljust(longest, b"\0"), dtype=np.uint8))
    blob = np.array(mx.distributed.all_gather(mine, stream=mx.cpu)).tobytes()
    return [json.loads(blob[r * longest: r * longest + n].decode()) for r, n in enumerate(lengths)]


def gather_shards(results: list) -> list:
    """Each rank's ``results`` for its :func:`shard`, gathered into the results of the whole list."""
    return unshard(gather(results))


def barrier() -> None:
    """Wait until every rank gets here (what rank 0 wrote before is there for the others to read)."""
    if launched():
        import mlx.core as mx

        mx.eval(mx.distributed.all_sum(mx.array(1, dtype=mx.int32), stream=mx.cpu))


def rank_zero_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then, once it is done, on the others (which find what it wrote)."""
    rank, _ = world()
    if rank == 0:
        out = fn()
        barrier()
        return out
    barrier()
    return fn()
