"""Sparse players and their fusion.

Player ``i`` holds one weight row (D weights and a bias) per label it owns and scores
``pi_i,l(x) = sigmoid(w_i,l . h(x) + b_i,l)`` only on the candidate labels of a batch. Each
player's table is an ``nn.Embedding`` with sparse gradients, so a step touches only the rows of
the candidates. The fused prediction for label ``l`` is ``p_l = sum_i a_i,l pi_i,l`` over the
label's owners, with ``a_.,l`` a softmax over learnable per-label fusion logits (uniform at start).

For a batch, the candidate labels ``C`` (a 1-D tensor of label ids) expand into *pairs*: one per
(candidate label, owning player), grouped player by player. :class:`Pairs` holds that layout; the
logits of a batch are a (B, M) tensor over the M pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xmlgame.shards import Shards


@dataclass
class Pairs:
    """The (candidate label, owner) pairs of one candidate set, grouped by player.

    Attributes:
        labels: int64 (C,) candidate label ids.
        col: int64 (M,) the column in ``labels`` of each pair.
        pos: int64 (M,) the owner position (0 or 1) of each pair.
        peer: int64 (M,) the index of the other pair of the same label, or -1.
        player_rows: per player, int64 rows of its table for its pairs (in pair order).
        player_slices: per player, the slice of the M pairs that are its.
        player: int64 (M,) the player of each pair.
        stacked_rows: int64 (M,) the row of each pair in the players' tables stacked end to
            end (player 0's rows first; see :attr:`Players.row_offsets`).
    """

    labels: torch.Tensor
    col: torch.Tensor
    pos: torch.Tensor
    peer: torch.Tensor
    player_rows: list[torch.Tensor]
    player_slices: list[slice]
    player: torch.Tensor
    stacked_rows: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.col.numel()


class Players(nn.Module):
    """N sparse players over overlapping label shards, plus the per-label fusion logits."""

    def __init__(
        self, shards: Shards, dim: int, label_prior: np.ndarray | None = None,
        sparse: bool = True, held: range | None = None,
    ):
        """``sparse=False`` gives dense gradients: faster when every label is a candidate.

        ``held`` (label-parallel training, see :mod:`xmlgame.parallel`): the contiguous block of
        players whose tables this process holds; the others get empty placeholder tables. Their
        random initial values are still drawn (one table at a time, then dropped), so the random
        stream, and with it every held table, is what a single process would have.
        """
        super().__init__()
        self.dim = dim
        self.n_players = shards.n_players
        self.held = range(self.n_players) if held is None else held
        # label-parallel: sums the partial fused scores of all processes (see predict_proba)
        self.combine = None
        self.register_buffer("owner_player", torch.from_numpy(shards.owner_player), False)
        self.register_buffer("owner_row", torch.from_numpy(shards.owner_row), False)
        # where each player's rows start when the tables are stacked end to end
        sizes = [len(labels) for labels in shards.player_labels]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.register_buffer("row_offsets", torch.from_numpy(offsets), False)
        # one table per player: D weights and a bias per owned label, (L_i, D + 1)
        self.tables = nn.ModuleList(
            nn.Embedding(len(labels), dim + 1, sparse=sparse) if i in self.held
            else _placeholder(len(labels), dim + 1, sparse)
            for i, labels in enumerate(shards.player_labels)
        )
        for i, (table, labels) in enumerate(zip(self.tables, shards.player_labels)):
            if i not in self.held:
                torch.empty(len(labels), dim + 1).normal_()  # the draws of the line below
                continue
            nn.init.normal_(table.weight, std=0.01)
            if label_prior is not None and len(labels):
                # start each bias at the label's prior log-odds: no wasted epochs learning it
                prior = np.clip(label_prior[labels], 1e-6, 1 - 1e-6)
                with torch.no_grad():
                    table.weight[:, -1] = torch.from_numpy(np.log(prior / (1 - prior)))
        # fusion logits, (L, 2); a missing second owner is masked out
        self.fusion = nn.Embedding(shards.n_labels, 2, sparse=sparse)
        nn.init.zeros_(self.fusion.weight)

    # layout

    def pairs(self, labels: torch.Tensor) -> Pairs:
        """Expand candidate label ids (C,) into their (label, owner) pairs."""
        labels = labels.to(self.owner_player.device)
        owners = self.owner_player[labels].reshape(-1)  # (2C,): (label, position) row-major
        entries = torch.nonzero(owners >= 0).squeeze(1)
        # group by player; the stable sort keeps label order within each player's pairs
        entries = entries[torch.sort(owners[entries], stable=True).indices]
        col, pos = entries // 2, entries % 2
        player = owners[entries]
        counts = torch.bincount(player, minlength=self.n_players).tolist()
        rows = self.owner_row[labels].reshape(-1)[entries]
        player_rows = list(torch.split(rows, counts))
        ends = np.cumsum(counts).tolist()
        slices = [slice(end - count, end) for end, count in zip(ends, counts)]
        # the other owner of each overlapping label
        pair_of = torch.full((labels.numel(), 2), -1, dtype=torch.long, device=labels.device)
        pair_of[col, pos] = torch.arange(col.numel(), device=labels.device)
        peer = pair_of[col, 1 - pos]
        return Pairs(labels, col, pos, peer, player_rows, slices, player,
                     rows + self.row_offsets[player])

    # scoring

    def player_logits(self, h: torch.Tensor, pairs: Pairs, player: int) -> torch.Tensor:
        """(B, M_i) logits of one player on its pairs; gradients reach only those rows."""
        w = self.tables[player](pairs.player_rows[player])  # (M_i, D + 1)
        return h @ w[:, :-1].T + w[:, -1]

    def logits(self, h: torch.Tensor, pairs: Pairs, players: range | None = None) -> torch.Tensor:
        """(B, M) logits of every player on its pairs; with ``players`` (a contiguous block of
        them), of their pairs only: (B, M') over :meth:`pairs_of` them."""
        parts = [
            self.player_logits(h, pairs, i)
            for i in (range(self.n_players) if players is None else players)
            if pairs.player_slices[i].stop > pairs.player_slices[i].start
        ]
        return torch.cat(parts, dim=1) if parts else h.new_zeros(h.shape[0], 0)

    @staticmethod
    def pairs_of(pairs: Pairs, players: range) -> slice:
        """The pairs of a contiguous block of players, a slice of the M pairs."""
        if not len(players):
            return slice(0, 0)
        return slice(pairs.player_slices[players[0]].start, pairs.player_slices[players[-1]].stop)

    def _predict_proba_held(self, h: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """Label-parallel :meth:`predict_proba`: this process fuses its players' pairs (zero for
        the others) and :attr:`combine` sums the parts over processes. A label has at most two
        owners and 0 + a + b = a + b exactly, so the result equals one process's to the bit."""
        probs = h.new_zeros(h.shape[0], pairs.n_pairs)
        probs[:, self.pairs_of(pairs, self.held)] = torch.sigmoid(self.logits(h, pairs, self.held))
        return self.combine(self.fuse(probs, pairs))

    def fusion_weights(self, pairs: Pairs) -> torch.Tensor:
        """(M,) softmax weight of each pair's player among the label's owners."""
        logits = self.fusion(pairs.labels)  # (C, 2)
        has_second = self.owner_player[pairs.labels, 1] >= 0
        mask = torch.stack([torch.ones_like(has_second), has_second], dim=1)
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        return weights[pairs.col, pairs.pos]

    def fuse(self, probs: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """Fused probabilities (B, C) from pair probabilities (B, M)."""
        weighted = probs * self.fusion_weights(pairs)
        fused = probs.new_zeros(probs.shape[0], pairs.labels.numel())
        return fused.index_add(1, pairs.col, weighted)

    @torch.no_grad()
    def predict_proba(self, h: torch.Tensor, pairs: Pairs) -> torch.Tensor:
        """Fused probabilities (B, C) for candidate labels."""
        if self.combine is not None:
            return self._predict_proba_held(h, pairs)
        return self.fuse(torch.sigmoid(self.logits(h, pairs)), pairs)

    @torch.no_grad()
    def predict_proba_each(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fused probabilities (B, K) of each document's own K labels (a shortlist).

        ``labels`` is int64 (B, K), -1 for an empty slot (scored -1). Only the owners' rows of
        the listed labels are read, so the cost is B x K rows whatever the label count. In
        label-parallel training each process scores its players' owners and :attr:`combine`
        adds the parts, as in :meth:`predict_proba`.
        """
        valid = labels >= 0
        safe = labels.clamp(min=0)
        owners = self.owner_player[safe]  # (B, K, 2)
        rows = self.owner_row[safe]
        probs = h.new_zeros(owners.shape)
        for player in self.held:
            doc, slot, position = torch.nonzero(owners == player, as_tuple=True)
            if doc.numel() == 0:
                continue
            w = self.tables[player].weight[rows[doc, slot, position]]  # (n, D + 1)
            logit = torch.einsum("nd,nd->n", h[doc], w[:, :-1]) + w[:, -1]
            probs[doc, slot, position] = torch.sigmoid(logit)
        fusion = self.fusion.weight[safe].masked_fill(owners < 0, float("-inf")).softmax(-1)
        fused = (probs * fusion).sum(-1)
        if self.combine is not None:
            fused = self.combine(fused)
        return fused.masked_fill(~valid, -1.0)


def _placeholder(n_rows: int, width: int, sparse: bool) -> nn.Embedding:
    """The empty table of a player another process holds, drawing the random numbers that
    ``nn.Embedding(n_rows, width)`` draws at construction."""
    torch.empty(n_rows, width).normal_()
    return nn.Embedding(0, width, sparse=sparse)
