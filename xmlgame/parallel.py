"""Training one run on several processes: data-parallel or label-parallel.

Every process runs the same loop over the same global batches (the same seeded order and
candidate labels, which are cheap to build from the batch's label rows), encodes its own block of
each batch's rows (:class:`BatchShare`), and the processes exchange what the game needs through a
:class:`~xmlgame.distributed.Communicator`. Both modes take, up to floating-point summation
order, the steps one process takes on the whole batch: the equivalence is tested.

**Data-parallel** (the default with several processes). Every process holds every player. The
game's sums divide by the whole batch's B x C, so the processes' partial gradients add up to the
whole batch's. In the cyclic step, after each player's closed-form gradient on its own rows, the
(M_i, D + 1) row gradient is summed over processes, every process takes the identical RowAdam
step and recomputes its own rows' logits; the fusion gradient (M,) is summed likewise; the
encoder backpropagates its rows and its gradients are summed (the bag-of-words rows each process
touched through a variable-length gather, dense parameters in one flattened all-reduce). The
joint schedule sums all gradients after its backward. Floats exchanged per step, per process:
``M (D + 1)`` for the players and ``M`` for fusion (all-reduce), the touched embedding rows of
every process ``sum_p nnz_p x D`` (all-gather) and the dense encoder parameters (all-reduce).
Head memory is that of one process.

**Label-parallel** (``--label-parallel``, cyclic schedule). The N players are split into P
contiguous blocks (:func:`~xmlgame.distributed.split_sizes`), one per process; a process holds
the tables and RowAdam state of its block only (the others are empty placeholders), so head
memory per process falls as 1/P. Per batch: each process encodes its rows and the (B, D)
``h`` is all-gathered; each process computes its players' logits on the whole batch and the
(B, M) logits are all-gathered, so every process holds the whole batch's state. Then, player by
player, the holder takes its step on the whole batch (no reduction needed) and broadcasts its new
(B, M_i) logits, which every process writes into its state. For the encoder, each process
multiplies its players' logit gradients by their weights, the (B, D) sum over processes is
dL/dh, and each backpropagates its rows (encoder gradients summed as in data-parallel). The
fusion table (L x 2) is small and replicated: every process has the whole state, so all take the
same fusion step without exchanging anything. Floats exchanged per step, per process: ``B D``
(h, all-gather) + ``B M`` (initial logits, all-gather) + ``B M`` (the N broadcasts) + ``B D``
(dL/dh, all-reduce) + the encoder's gradients as in data-parallel. Players step one after
another, so their work is not spread over processes: label-parallel saves memory, not time.

**Evaluation.** Data-parallel: the test documents' batches are dealt in contiguous blocks, each
process predicts its documents with batches that are exactly one process's, and the top-k lists
are gathered in order (the uneven last block and an empty one included): metrics equal one
process's exactly. Label-parallel: every process encodes every batch, fuses its players' pairs
and the partial fused scores are summed over processes (exact, see
:meth:`~xmlgame.players.Players.predict_proba`): ``B x L`` floats per batch, as every label is
scored.

**Checkpoints and weights** are written by the main process in the single-process layout (a
label-parallel run's tables and optimizer states are sent to it by their holders), so a run
resumes on any number of processes; on loading, each process reads what it holds.

**Randomness.** All processes seed alike and draw the same numbers: the batch order and sampled
candidates (numpy, per epoch), and the dropout masks, drawn for the whole batch and sliced by rows
(:class:`~xmlgame.encoders.BatchDropout`). A fine-tuned transformer's own dropout is the
exception: each process draws its own masks, so such runs agree statistically, not numerically.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from xmlgame.distributed import SINGLE, Communicator, cpu_tensors, split_sizes
from xmlgame.errors import XmlgameError
from xmlgame.game import (
    BatchState,
    Payoffs,
    fusion_logit_gradient,
    pair_logit_gradient,
    pair_major_logits,
)
from xmlgame.optim import set_row_gradient, step_table_rows

PREDICT_BATCH = 512  # documents per prediction batch (validation and test)
MIXED_PRECISION = ("no", "bf16")


def check_launch(config, comm: Communicator) -> None:
    """Stop with a clear message if the run's options do not fit this launch."""
    if config.mixed_precision == "bf16" and comm.device.type != "cuda":
        raise XmlgameError(
            "--mixed-precision bf16 needs a GPU: these processes run on the CPU, whose bf16 "
            "is slower than float32; use --mixed-precision no"
        )
    if config.label_parallel and comm.world_size > config.players:
        raise XmlgameError(
            f"--label-parallel gives each process a block of players: {config.players} players "
            f"cannot be split over {comm.world_size} processes; use --players "
            f"{comm.world_size} or more, or data-parallel training"
        )


# --------------------------------------------------------------------------------------------
# a process's rows of a batch, and the encoder's pass over them


@dataclass
class BatchShare:
    """This process's share of a batch of ``n_rows`` documents: rows ``[start, stop)``, encoded
    in ``micro`` micro-batches (gradient accumulation). One process: the whole batch."""

    n_rows: int
    start: int = 0
    stop: int | None = None
    micro: int = 1
    comm: Communicator = SINGLE
    autocast: Callable[[], AbstractContextManager] = nullcontext

    def __post_init__(self):
        if self.stop is None:
            self.stop = self.n_rows

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    def parts(self, local_rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(offset within this process's rows, rows) of each non-empty micro-batch."""
        out, offset = [], 0
        for size in split_sizes(len(local_rows), self.micro):
            if size:
                out.append((offset, local_rows[offset : offset + size]))
            offset += size
        return out

    def sum_payoffs(self, result: Payoffs) -> Payoffs:
        """R, C_i and Phi of the whole batch from each process's part (data-parallel)."""
        if not self.comm.active:
            return result
        values = torch.cat([result.R.detach().reshape(1), result.phi.detach().reshape(1),
                            result.C.detach()])
        self.comm.all_reduce_(values)
        return Payoffs(values[0], values[2:], values[1])


def _random_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_random_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class EncoderPass:
    """``h(x)`` of this process's rows of a batch (:attr:`h`, (B_p, D) float32), then the
    encoder's backward from dL/dh (:meth:`backward`).

    ``parts`` are the (offset, size, inputs) of the micro-batches, or one ``batch_inputs``
    dict for all of this process's rows. With one part, ``h`` keeps its graph and the backward
    is ``h.backward``: the single-process path. With several (gradient
    accumulation), each is encoded without a graph; :meth:`backward` encodes each again with
    its graph and backpropagates its rows of dL/dh, so the encoder's gradients sum over the
    micro-batches exactly as over one batch while activations are held for one micro-batch at a
    time. Both passes see the same ``h``: dropout masks are the batch's
    (:class:`~xmlgame.encoders.BatchDropout`), and the random state is replayed for anything
    else random inside the encoder. The forward runs under ``share.autocast`` (bf16 on GPUs);
    ``h`` is cast back to float32, so the players' closed-form math stays in float32.
    """

    def __init__(self, encoder, parts: dict | list[tuple[int, int, dict]], share: BatchShare):
        if isinstance(parts, dict):
            parts = [(0, share.stop - share.start, parts)]
        self.encoder = encoder
        self.parts = parts
        self.share = share
        encoder.draw_dropout(share.n_rows)
        if not parts:  # no rows here (a batch smaller than the number of processes)
            self.h = torch.zeros(0, encoder.dim, device=encoder.device)
        elif len(parts) == 1:
            self.h = self._forward(*parts[0])
        else:
            self.states = []
            with torch.no_grad():
                hs = []
                for part in parts:
                    self.states.append(_random_state(encoder.device))
                    hs.append(self._forward(*part))
            self.after = _random_state(encoder.device)
            self.h = torch.cat(hs)

    def _forward(self, offset: int, size: int, inputs: dict) -> torch.Tensor:
        self.encoder.dropout_rows(self.share.start + offset)
        with self.share.autocast():
            return self.encoder(inputs).float()

    def backward(self, grad_h: torch.Tensor) -> None:
        """Backpropagate dL/dh (B_p, D) of this process's rows into the encoder."""
        if len(self.parts) == 1:
            self.h.backward(grad_h)
        elif len(self.parts) > 1:
            for part, state in zip(self.parts, self.states):
                _set_random_state(state, self.encoder.device)
                offset, size, _ = part
                self._forward(*part).backward(grad_h[offset : offset + size])
            _set_random_state(self.after, self.encoder.device)
        self.done()

    def done(self) -> None:
        self.encoder.clear_dropout()


# --------------------------------------------------------------------------------------------
# the plan of a run over processes


@dataclass
class Parallel:
    """How a run is split over the processes of a launch, as this process sees it.

    ``players`` is the block of players this process holds (all of them unless label-parallel).
    """

    comm: Communicator
    n_players: int
    label_parallel: bool = False
    micro: int = 1
    autocast: Callable[[], AbstractContextManager] = nullcontext
    players: range = field(init=False)

    def __post_init__(self):
        self.label_parallel = self.label_parallel and self.comm.active
        if self.label_parallel:
            sizes = split_sizes(self.n_players, self.comm.world_size)
            start = sum(sizes[: self.comm.rank])
            self.players = range(start, start + sizes[self.comm.rank])
        else:
            self.players = range(self.n_players)

    @property
    def held_players(self) -> range | None:
        """What the model should hold: None (all players) unless label-parallel."""
        return self.players if self.label_parallel else None

    def holder(self, player: int) -> int:
        """The process whose copy of ``player`` is saved: its holder in label-parallel training,
        the main process otherwise."""
        if not self.label_parallel:
            return 0
        sizes = np.cumsum(split_sizes(self.n_players, self.comm.world_size))
        return int(np.searchsorted(sizes, player, side="right"))

    def describe(self) -> str:
        if not self.comm.active:
            mode = "1 process"
        else:
            mode = f"{self.comm.world_size} processes, " + (
                "label-parallel" if self.label_parallel else "data-parallel")
        accumulate = f", {self.micro} micro-batches per batch" if self.micro > 1 else ""
        return f"{mode} on {self.comm.device.type}{accumulate}"

    def attach(self, model) -> None:
        """Point a label-parallel model's prediction at the other processes' players."""
        if self.label_parallel:
            model.players.combine = self.comm.all_reduce_

    # a batch

    def share(self, n_rows: int) -> BatchShare:
        rows = self.comm.block(n_rows)
        return BatchShare(n_rows, rows.start, rows.stop, self.micro, self.comm, self.autocast)

    # prediction

    def predict(self, model, features, k: int, batch_size: int = PREDICT_BATCH):
        """Top-k predictions of every document of ``features`` on every process, equal to one
        process's with the same ``batch_size`` (see the module docstring)."""
        from xmlgame.model import Prediction

        if not self.comm.active or self.label_parallel:
            return model.predict_features(features, k=k, batch_size=batch_size)
        rows = self.evaluation_rows(len(features), batch_size)
        local = model.predict_features(features.subset(rows), k=k, batch_size=batch_size)
        device = self.comm.device
        ids, scores = self.comm.all_gather_rows(torch.from_numpy(local.label_ids).to(device),
                                                torch.from_numpy(local.scores).to(device))
        return Prediction(ids.cpu().numpy(), scores.cpu().numpy())

    def evaluation_rows(self, n: int, batch_size: int) -> np.ndarray:
        """The documents this process scores in a sum over documents (tail leaders): a block of
        whole batches in data-parallel training, all of them in label-parallel training."""
        if not self.comm.active or self.label_parallel:
            return np.arange(n)
        batches = self.comm.block(-(-n // batch_size))
        return np.arange(batches.start * batch_size, min(batches.stop * batch_size, n))

    # state in the single-process layout

    def state_dict(self, model) -> dict | None:
        """The model's weights as one process holds them, on the main process (None on the
        others): a label-parallel run's tables are sent to it by their holders."""
        state = dict(model.state_dict())
        for i, labels in enumerate(model.shards.player_labels):
            holder = self.holder(i)
            if holder == 0:
                continue
            key = f"players.tables.{i}.weight"
            if self.comm.rank == holder:
                self.comm.send_(state[key], 0)
            elif self.comm.is_main:
                state[key] = self.comm.recv((len(labels), model.players.dim + 1),
                                            state[key].dtype, holder)
        return {k: v.detach().cpu() for k, v in state.items()} if self.comm.is_main else None

    def optimizer_states(self, opt, model) -> list | None:
        """The optimizers' states in the single-process layout (one per player that owns labels,
        then fusion, then the encoder's), on the main process (None on the others)."""
        states = []
        for i, labels in enumerate(model.shards.player_labels):
            if not len(labels):
                continue
            holder = self.holder(i)
            if holder == 0:
                if self.comm.is_main:
                    states.append(cpu_tensors(opt.players[i].state_dict()))
            elif self.comm.rank == holder:
                self.comm.send_object(cpu_tensors(opt.players[i].state_dict()), 0)
            elif self.comm.is_main:
                states.append(self.comm.recv_object(holder))
        if not self.comm.is_main:
            return None
        return states + [cpu_tensors(o.state_dict()) for o in [opt.fusion] + opt.encoder]

    def load_optimizer_states(self, opt, model, states: list, copy: bool = False) -> None:
        """Load optimizer states of the single-process layout, each process what it holds;
        ``copy`` its players' tensors (from a memory-mapped file, not to keep it mapped)."""
        owners = [i for i, labels in enumerate(model.shards.player_labels) if len(labels)]
        for state, i in zip(states, owners):
            if opt.players[i] is not None:
                if copy:
                    state = {**state, "state": {k: {n: v.clone() if torch.is_tensor(v) else v
                                                    for n, v in entry.items()}
                                                for k, entry in state["state"].items()}}
                opt.players[i].load_state_dict(state)
        for optimizer, state in zip([opt.fusion] + opt.encoder, states[len(owners):]):
            optimizer.load_state_dict(state)

    def head_bytes(self, model, opt) -> int:
        """Bytes of the player tables this process holds and of their optimizer states."""
        total = 0
        for table, optimizer in zip(model.players.tables, opt.players):
            total += table.weight.numel() * table.weight.element_size()
            if optimizer is not None:
                for state in optimizer.state.values():
                    total += sum(v.numel() * v.element_size() for v in state.values()
                                 if isinstance(v, torch.Tensor))
        return total


# --------------------------------------------------------------------------------------------
# the label-parallel cyclic step


def label_parallel_step(model, opt, parts, pairs, targets, rarity, game, probe,
                        share: BatchShare, parallel: Parallel):
    """One batch of the cyclic game with the players split over processes.

    ``targets`` (B, C) are the whole batch's; ``parts`` are the encoder inputs of this process's
    rows (see :class:`EncoderPass`). Takes the steps one process takes on the whole batch (see
    the module docstring for what is exchanged). Returns the batch's R, C_i and Phi with a
    ``probe`` (a measured batch), None otherwise.
    """
    comm, players = share.comm, model.players
    encoded = EncoderPass(model.encoder, parts, share)
    h = comm.all_gather_rows(encoded.h.detach())  # (B, D): every process's rows
    h1 = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)  # (B, D + 1): bias column
    held = parallel.players
    own = players.pairs_of(pairs, held)
    with torch.no_grad():
        weights = {i: players.tables[i](pairs.player_rows[i]) for i in held}  # (M_i, D + 1)
        mine = [pair_major_logits(w, h) for w in weights.values()]
        mine = torch.cat(mine) if mine else h.new_zeros(0, h.shape[0])  # (M_own, B)
        logits = comm.all_gather_rows(mine)  # (M, B)
    state = BatchState.start(logits, targets, rarity, pairs, players, game)

    # players: the holder of each takes its step on the whole batch and broadcasts its logits
    for i in range(players.n_players):
        span = pairs.player_slices[i]
        if span.stop == span.start:
            continue
        holder = parallel.holder(i)
        if comm.rank == holder:
            grad_rows = pair_logit_gradient(state, game, span) @ h1  # (M_i, D + 1)
            rows = pairs.player_rows[i]
            if probe is not None:
                probe.record(i, rows, grad_rows.norm(dim=1))
            weights[i] = step_table_rows(opt.players[i], players.tables[i], rows, grad_rows)
            with torch.no_grad():
                new = pair_major_logits(weights[i], h)  # (M_i, B)
        else:
            new = h.new_empty(span.stop - span.start, h.shape[0])
        state.replace(i, comm.broadcast_(new, holder))

    # encoder: dL/dh summed over the processes' players; fusion: the same step everywhere
    grad_own = pair_logit_gradient(state, game, own)  # (M_own, B)
    w_own = torch.cat([weights[i] for i in held]) if len(held) else h.new_zeros(0, h.shape[1] + 1)
    grad_h = comm.all_reduce_(grad_own.T @ w_own[:, :-1])  # (B, D)
    for o in [opt.fusion] + opt.encoder:
        o.zero_grad(set_to_none=True)
    encoded.backward(grad_h[share.rows])
    fusion_rows = torch.zeros(pairs.labels.numel(), 2, device=h.device).index_put_(
        (pairs.col, pairs.pos), fusion_logit_gradient(state)
    )
    set_row_gradient(players.fusion, pairs.labels, fusion_rows)
    encoder = model.encoder
    comm.sync_gradients_(encoder.sparse_parameters(), encoder.dense_parameters())
    for o in [opt.fusion] + opt.encoder:
        o.step()
    if probe is None:
        return None
    return state.payoffs(game)
