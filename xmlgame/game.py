"""The cooperative game: shared payoff, curiosity, player objectives and the potential.

With ``y`` the (B, C) targets of a batch's candidate labels and ``M`` (label, owner) pairs:

- shared payoff ``R = -mean BCE(p_l, y_l)`` over the B x C candidate entries, ``p`` fused;
- curiosity of player ``i``
  ``C_i = [sum over its pairs of r_l * loglik(pi_i,l, y_l)
           + beta * sum over its overlapping pairs of r_l * D(pi_i,l, sg(peer mean))] / (B * C)``
  with rarity ``r_l = 1 / (1 + n_l)``, ``sg`` a stop-gradient, and ``D`` the squared difference
  (bounded in [0, 1]). Sums are divided by ``B * C`` so that ``C_i`` and ``R`` share a scale;
- player objective ``J_i = R + alpha * C_i``; potential ``Phi = R + alpha * sum_i C_i``.

Peers enter ``C_i`` only through ``sg``, so the gradient of ``J_i`` with respect to player
``i``'s parameters equals the gradient of ``Phi``: every best-response step climbs ``Phi``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from xmlgame.errors import XmlgameError
from xmlgame.players import Pairs, Players

EPS = 1e-6
DIVERGENCES = ("squared", "absolute")
CURIOSITY_TARGETS = ("all", "positives")


@dataclass
class GameConfig:
    """The game's weights and schedule."""

    alpha: float = 16.0  # weight of curiosity (chosen on debtags validation from 1, 4, 16, 64)
    beta: float = 0.1  # weight of disagreement inside curiosity
    divergence: str = "squared"
    schedule: str = "cyclic"  # or "joint"
    # the rarity-weighted log-likelihood over all candidate entries, or over positives only
    curiosity_targets: str = "all"

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0:
            raise XmlgameError(
                f"--alpha and --beta must be >= 0, got {self.alpha} and {self.beta}"
            )
        if self.divergence not in DIVERGENCES:
            raise XmlgameError(f"divergence {self.divergence!r}: choose one of {DIVERGENCES}")
        if self.curiosity_targets not in CURIOSITY_TARGETS:
            raise XmlgameError(
                f"--curiosity-targets {self.curiosity_targets!r}: choose one of "
                f"{', '.join(CURIOSITY_TARGETS)}"
            )
        if self.schedule not in ("cyclic", "joint"):
            raise XmlgameError(f"--schedule {self.schedule!r}: choose cyclic or joint")


@dataclass
class Payoffs:
    """The game's quantities on one batch (scalars, with graph)."""

    R: torch.Tensor  # noqa: N815 (the method's notation)
    C: torch.Tensor  # noqa: N815 (N,) curiosity of each player
    phi: torch.Tensor

    def J(self, player: int, alpha: float) -> torch.Tensor:  # noqa: N802
        return self.R + alpha * self.C[player]


def divergence(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    diff = a - b
    return diff * diff if kind == "squared" else diff.abs()


def payoffs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rarity: torch.Tensor,
    pairs: Pairs,
    players: Players,
    config: GameConfig,
    n_entries: int | None = None,
) -> Payoffs:
    """R, each C_i and Phi from pair logits (B, M), targets (B, C) and rarity (C,).

    ``n_entries`` is the B x C the sums are divided by: that of ``targets`` unless these are
    one process's rows of a larger batch (then the parts of the processes add up to the whole).
    """
    n_entries = targets.numel() if n_entries is None else n_entries
    probs = torch.sigmoid(logits)  # (B, M)
    fused = players.fuse(probs, pairs).clamp(EPS, 1 - EPS)  # (B, C)
    R = -F.binary_cross_entropy(fused, targets, reduction="sum") / n_entries  # noqa: N806

    n_players = players.n_players
    if config.alpha == 0:
        curiosity = logits.new_zeros(n_players)
        return Payoffs(R, curiosity, R)

    pair_targets = targets[:, pairs.col]  # (B, M)
    pair_rarity = rarity[pairs.col]  # (M,)
    loglik = -F.binary_cross_entropy_with_logits(logits, pair_targets, reduction="none")
    if config.curiosity_targets == "positives":
        loglik = loglik * pair_targets
    per_pair = (loglik * pair_rarity).sum(0)  # (M,)

    overlapping = pairs.peer >= 0
    if config.beta > 0 and overlapping.any():
        own = probs[:, overlapping]
        peer = probs[:, pairs.peer[overlapping]].detach()  # sg(mean of peers): one peer here
        disagree = divergence(own, peer, config.divergence).sum(0) * pair_rarity[overlapping]
        per_pair = per_pair.index_add(0, torch.nonzero(overlapping).squeeze(1),
                                      config.beta * disagree)

    curiosity = torch.stack([per_pair[s].sum() for s in pairs.player_slices]) / n_entries
    return Payoffs(R, curiosity, R + config.alpha * curiosity.sum())


# --------------------------------------------------------------------------------------------
# closed-form gradients for the cyclic schedule


@dataclass
class BatchState:
    """What the cyclic schedule keeps of a batch while players move: no graph, just values.

    ``logits``/``probs`` are (B, M) over pairs, ``fused`` the (B, C) fused probabilities before
    clamping, ``weights`` the (M,) fusion weight of each pair; ``pair_targets`` (B, M) and
    ``pair_rarity`` (M,) are the targets and rarity of each pair's label, gathered once so that
    a player's slice of them is a view. After a player's step, :meth:`replace` updates its pairs
    and the fused columns they feed. ``n_entries`` is the B x C that R and C_i divide by: the
    batch's own, or the whole batch's when these rows are one process's part of it.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    fused: torch.Tensor
    weights: torch.Tensor
    pair_targets: torch.Tensor
    pair_rarity: torch.Tensor
    pairs: Pairs
    n_entries: int

    @classmethod
    def start(cls, logits, targets, rarity, pairs: Pairs, players: Players,
              n_entries: int | None = None) -> BatchState:
        with torch.no_grad():
            probs = torch.sigmoid(logits)
            weights = players.fusion_weights(pairs)
            fused = probs.new_zeros(targets.shape).index_add_(1, pairs.col, probs * weights)
        return cls(logits, probs, fused, weights, targets[:, pairs.col], rarity[pairs.col], pairs,
                   targets.numel() if n_entries is None else n_entries)

    @torch.no_grad()
    def replace(self, player: int, logits: torch.Tensor) -> None:
        own = self.pairs.player_slices[player]
        probs = torch.sigmoid(logits)
        delta = (probs - self.probs[:, own]) * self.weights[own]
        self.fused.index_add_(1, self.pairs.col[own], delta)
        self.logits[:, own] = logits
        self.probs[:, own] = probs

    @torch.no_grad()
    def fused_slope(self, select) -> torch.Tensor:
        """dR/dp at the labels of the pairs ``select``, (B, |select|); 0 where p is clamped."""
        raw = self.fused[:, self.pairs.col[select]]
        fused = raw.clamp(EPS, 1 - EPS)
        inside = fused == raw
        slope = (self.pair_targets[:, select] - fused).div_(fused * (1 - fused))
        return slope.mul_(inside).div_(self.n_entries)


@torch.no_grad()
def pair_logit_gradient(
    state: BatchState, config: GameConfig, select, slope_fused: torch.Tensor | None = None
) -> torch.Tensor:
    """d(-Phi)/dz for the pairs ``select`` (a slice of them), (B, |select|).

    For a player's own pairs this is also d(-J_i)/dz: peers enter J_i only through sg, so the
    two differ by terms that do not depend on player i. It is the derivative autograd takes
    through :func:`payoffs` (a test checks it), computed without building a graph.
    ``slope_fused`` is ``state.fused_slope(select)`` when the caller has it already.
    """
    pairs = state.pairs
    pi = state.probs[:, select]
    slope = pi * (1 - pi)  # dpi/dz
    if slope_fused is None:
        slope_fused = state.fused_slope(select)
    grad = slope_fused * state.weights[select] * slope  # dR/dz
    if config.alpha > 0:
        targets = state.pair_targets[:, select]
        r = state.pair_rarity[select] * (config.alpha / state.n_entries)
        if config.curiosity_targets == "positives":
            grad += r * targets * (1 - pi)  # rarity-weighted log-likelihood of positives
        else:
            grad += r * (targets - pi)  # rarity-weighted log-likelihood
        shared, peers = pairs.overlap(select)
        if config.beta > 0 and shared.numel():
            diff = pi.index_select(1, shared) - state.probs.index_select(1, peers)
            d = 2 * diff if config.divergence == "squared" else torch.sign(diff)
            push = config.beta * r[shared] * d * slope.index_select(1, shared)
            grad.index_add_(1, shared, push)
    return -grad


@torch.no_grad()
def fusion_logit_gradient(
    state: BatchState, slope_fused: torch.Tensor | None = None
) -> torch.Tensor:
    """d(-Phi)/d(fusion logits) of each pair, (M,): only R depends on fusion.

    With ``a = softmax`` over a label's owners and ``g_m = dR/da_m``, the logit gradient is
    ``a_m (g_m - sum_o a_o g_o)``; single-owner labels get zero. ``slope_fused`` is
    ``state.fused_slope(slice(None))`` when the caller has it already.
    """
    pairs = state.pairs
    if slope_fused is None:
        slope_fused = state.fused_slope(slice(None))
    g = (slope_fused * state.probs).sum(0)  # (M,)
    ag = state.weights * g
    per_label = ag.new_zeros(pairs.labels.numel()).index_add_(0, pairs.col, ag)
    return -(ag - state.weights * per_label[pairs.col])
