"""The processes of a launch and what they exchange, behind one object that is a no-op alone.

xmlgame's cyclic step takes closed-form gradient steps on sparse tables, one player after
another, which ``DistributedDataParallel`` (a dense all-reduce hooked into autograd's backward)
does not fit. The trainer synchronises explicitly instead, through :class:`Communicator`: a thin
layer over ``torch.distributed`` whose methods return at once in a single process, so the
single-process path runs the same code at the same speed.

How processes start:

- ``accelerate launch`` (``--multi_gpu`` gives real ranks, on GPUs or, with gloo, on CPUs) or
  ``torchrun`` set the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...); accelerate's
  state reads it and starts ``torch.distributed``: NCCL on GPUs, gloo on CPUs. Each process uses
  the GPU of its local rank.
- ``xmlgame train --num-processes P`` runs the same command again as P processes on this machine
  through ``python -m torch.distributed.run --standalone`` (:func:`relaunch`), and each of them
  checks that it was launched as P (:func:`check_world_size`).

The rule for splitting n items (a batch's rows, a list of players, the batches of an evaluation)
over P processes is :func:`split_sizes`: contiguous blocks in rank order, sizes differing by at
most one, the first ``n % P`` blocks one larger; when n < P the last processes get nothing, and
every collective still runs on every process (with empty tensors), so calls always line up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.distributed as dist

from xmlgame.errors import XmlgameError


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of the ``parts`` contiguous blocks ``n`` items fall into (the first ``n % parts``
    blocks one larger)."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def block(n: int, parts: int, index: int) -> slice:
    """Block ``index`` of :func:`split_sizes` as a slice of ``range(n)``."""
    sizes = split_sizes(n, parts)
    start = sum(sizes[:index])
    return slice(start, start + sizes[index])


class Communicator:
    """This process's rank among the ``world_size`` processes of a launch, and the collectives.

    Every method is a no-op (or an identity) when ``world_size`` is 1. Tensors passed to
    collectives must be on :attr:`device` (a GPU under NCCL). All processes must call the same
    collectives in the same order; sizes may differ where a method says so.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    @classmethod
    def current(cls) -> Communicator:
        """The communicator of this process, from accelerate's state: that starts
        ``torch.distributed`` when a launcher set the environment, and is a single process
        otherwise."""
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        device = state.device if state.device.type != "cpu" else torch.device("cpu")
        return cls(state.process_index, state.num_processes, device)

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size}, {self.device})"

    @property
    def active(self) -> bool:
        """Whether there is anyone to talk to."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files, logs and shows progress."""
        return self.rank == 0

    # splitting

    def block(self, n: int) -> slice:
        """This process's contiguous block of ``n`` items (see :func:`split_sizes`)."""
        return block(n, self.world_size, self.rank)

    # dense tensors

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes, in place; returns it."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_many_(self, tensors: list[torch.Tensor]) -> None:
        """Sum several tensors (of one dtype) over processes in one collective, in place."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` with process ``src``'s, in place (same shape everywhere)."""
        if self.active:
            dist.broadcast(tensor, src)
        return tensor

    def all_gather_rows(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Concatenate each tensor along dim 0 over processes, in rank order.

        The number of rows may differ between processes (0 included); the tensors given
        together must share it, and each must have the same trailing shape everywhere. Rows are
        padded to the longest for the collective and the padding dropped.
        """
        if not self.active:
            return tensors[0] if len(tensors) == 1 else tensors
        n = tensors[0].shape[0]
        counts = torch.tensor([n], dtype=torch.long, device=self.device)
        gathered = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(gathered, counts)
        sizes = [int(c.item()) for c in gathered]
        longest = max(sizes)
        out = []
        for tensor in tensors:
            if longest == 0:
                out.append(tensor)
                continue
            padded = tensor.new_zeros((longest, *tensor.shape[1:]))
            padded[:n] = tensor
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            out.append(torch.cat([part[:size] for part, size in zip(parts, sizes)]))
        return out[0] if len(out) == 1 else tuple(out)

    # gradients

    def sync_sparse_grad_(self, param: torch.Tensor) -> None:
        """Sum a sparse (row) gradient over processes whose row sets differ.

        Each process coalesces its gradient, the (rows, values) of all are gathered (variable
        lengths) and coalesced again, so every process ends with the same sparse gradient: the
        rows any process touched, each the sum of its values. Cost: the touched rows of every
        process, ``sum_p nnz_p x (D + 1)`` floats, received by each.
        """
        if not self.active:
            return
        grad = param.grad
        if grad is None:
            rows = torch.zeros(0, dtype=torch.long, device=param.device)
            values = param.new_zeros((0, *param.shape[1:]))
        else:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        rows, values = self.all_gather_rows(rows, values)
        param.grad = torch.sparse_coo_tensor(
            rows[None], values, param.shape, check_invariants=False
        ).coalesce()

    def sync_gradients_(self, sparse: Iterable[torch.Tensor], dense: Iterable[torch.Tensor]):
        """Sum gradients over processes: sparse row gradients one by one, dense ones in a single
        flattened all-reduce (a missing dense gradient counts as zeros)."""
        if not self.active:
            return
        for param in sparse:
            self.sync_sparse_grad_(param)
        dense = list(dense)
        for param in dense:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        self.all_reduce_many_([param.grad for param in dense])

    # point to point, for gathering what one process holds onto the main one

    def send_(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst)

    def recv(self, shape: tuple, dtype: torch.dtype, src: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tensor, src)
        return tensor

    def send_object(self, obj, dst: int) -> None:
        """Send a picklable object (tensors in it on the CPU) to process ``dst``."""
        dist.send_object_list([obj], dst=dst, device=self._object_device())

    def recv_object(self, src: int):
        box = [None]
        dist.recv_object_list(box, src=src, device=self._object_device())
        return box[0]

    # objects and coordination

    def broadcast_object(self, obj=None, src: int = 0):
        """Process ``src``'s ``obj`` (picklable) on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def on_main(self, fn: Callable):
        """``fn()`` run on the main process only, its result given to every process; an
        :class:`XmlgameError` it raises is raised on every process (so all exit alike)."""
        if not self.active:
            return fn()
        if not self.is_main:
            result, error = self.broadcast_object()
            if error is not None:
                raise XmlgameError(error)
            return result
        try:
            result = fn()
        except XmlgameError as error:
            self.broadcast_object((None, str(error)))
            raise
        except BaseException as error:
            self.broadcast_object((None, f"the main process stopped: {error!r}"))
            raise
        self.broadcast_object((result, None))
        return result

    @contextmanager
    def main_first(self):
        """Run the block on the main process first, then on the others (e.g. preparing or
        caching files the others then read). If it fails on the main process, the others stop
        with an error instead of waiting."""
        if not self.active:
            yield
            return
        if self.is_main:
            try:
                yield
            except BaseException as error:
                self.broadcast_object(f"{type(error).__name__}: {error}")
                raise
            self.broadcast_object(None)
        else:
            failed = self.broadcast_object(None)
            if failed is not None:
                raise XmlgameError(f"the main process stopped: {failed}")
            yield

    def _object_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = Communicator()  # a lone process


# --------------------------------------------------------------------------------------------
# launching


def launched_world_size() -> int | None:
    """The number of processes a launcher (torchrun, accelerate launch) started, or None."""
    size = os.environ.get("WORLD_SIZE")
    return int(size) if size else None


def check_world_size(num_processes: int) -> None:
    """Stop with a clear message unless this process is one of ``num_processes``."""
    if num_processes < 1:
        raise XmlgameError(f"--num-processes must be at least 1, got {num_processes}")
    launched = launched_world_size() or 1
    if launched != num_processes:
        raise XmlgameError(
            f"--num-processes {num_processes}, but the launcher started {launched} processes; "
            "give the launcher's count (or leave out --num-processes under a launcher)"
        )


def relaunch(num_processes: int, argv: list[str]) -> int:
    """Run ``python -m xmlgame.cli ARGV`` as ``num_processes`` processes on this machine, through
    ``torch.distributed.run --standalone``; returns their exit code (the first failure's).

    Each process gets ``OMP_NUM_THREADS`` = CPUs / processes unless it is set already, so that
    processes sharing the CPUs do not oversubscribe them.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={num_processes}", "-m", "xmlgame.cli", *argv,
    ]
    return subprocess.call(command, env=env)


def cpu_tensors(obj):
    """``obj`` (nested dicts and lists) with every tensor moved to the CPU, for pickling."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_tensors(v) for v in obj)
    return obj
