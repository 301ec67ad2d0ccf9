"""Label shards: which players own which labels.

Labels are shuffled with the run's seed and dealt round-robin into ``N`` shards, one per player.
Then a fraction ``rho`` of the labels (chosen with the same seed) is also given to a second
player, picked uniformly among the other ``N - 1``, so that shards overlap. Every label has one or
two owners. With ``N = 1`` or ``rho = 0`` there is no overlap; with more players than labels some
players own nothing (allowed, with a warning: they simply never score).

A label's owners are stored as two aligned (L, 2) arrays: ``owner_player`` (player index, or -1
for "no second owner") and ``owner_row`` (the row of that label in the player's weight table).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmlgame.errors import XmlgameError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shards:
    """The label-to-player assignment of a run.

    Attributes:
        owner_player: int64 (L, 2): the owning players of each label; column 1 is -1 when the
            label has a single owner.
        owner_row: int64 (L, 2): the label's row in each owner's weight table (-1 likewise).
        player_labels: for each player, the int64 label ids it owns, in row order.
    """

    owner_player: np.ndarray
    owner_row: np.ndarray
    player_labels: tuple[np.ndarray, ...]

    @property
    def n_players(self) -> int:
        return len(self.player_labels)

    @property
    def n_labels(self) -> int:
        return self.owner_player.shape[0]

    @property
    def overlapping(self) -> np.ndarray:
        """bool (L,): labels owned by two players."""
        return self.owner_player[:, 1] >= 0

    def overlap_ratio(self) -> float:
        return float(self.overlapping.mean()) if self.n_labels else 0.0

    def save(self, path: Path) -> None:
        np.savez(path, owner_player=self.owner_player, n_players=self.n_players)

    @classmethod
    def load(cls, path: Path) -> Shards:
        with np.load(path) as f:
            return cls.from_owners(f["owner_player"], int(f["n_players"]))

    @classmethod
    def from_owners(cls, owner_player: np.ndarray, n_players: int) -> Shards:
        """Derive rows and per-player label lists from the (L, 2) owner table."""
        owner_row = np.full_like(owner_player, -1)
        player_labels = []
        for player in range(n_players):
            mask = owner_player == player  # (L, 2)
            labels = np.flatnonzero(mask.any(axis=1))
            owner_row[mask] = np.searchsorted(labels, np.nonzero(mask)[0])
            player_labels.append(labels.astype(np.int64))
        return cls(owner_player.astype(np.int64), owner_row, tuple(player_labels))


def make_shards(n_labels: int, n_players: int, overlap: float, seed: int) -> Shards:
    """Deal ``n_labels`` labels to ``n_players`` players with overlap fraction ``overlap``."""
    if n_players < 1:
        raise XmlgameError(f"--players must be at least 1, got {n_players}")
    if not 0.0 <= overlap <= 1.0:
        raise XmlgameError(f"--overlap must be between 0 and 1, got {overlap}")
    if n_players > n_labels:
        logger.warning(
            "%d players for %d labels: %d players will own no label",
            n_players, n_labels, n_players - n_labels,
        )
    rng = np.random.default_rng(seed)
    owner_player = np.full((n_labels, 2), -1, dtype=np.int64)

    # first owners: a seeded shuffle dealt round-robin, so shard sizes differ by at most one
    order = rng.permutation(n_labels)
    owner_player[order, 0] = np.arange(n_labels) % n_players

    # second owners for a fraction `overlap` of the labels, a different player each
    if n_players > 1 and overlap > 0:
        n_shared = int(round(overlap * n_labels))
        shared = rng.choice(n_labels, size=n_shared, replace=False)
        shift = rng.integers(1, n_players, size=n_shared)
        owner_player[shared, 1] = (owner_player[shared, 0] + shift) % n_players
    elif overlap > 0:
        logger.info("one player: --overlap %.2f has no effect", overlap)
    return Shards.from_owners(owner_player, n_players)
