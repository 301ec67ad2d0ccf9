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

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F  # noqa: N812

from xmlgame.errors import XmlgameError
from xmlgame.players import Pairs, Players

EPS = 1e-6
DIVERGENCES = ("squared", "absolute")
# the default weight of negatives in curiosity's log-likelihood, by whether every label is a
# candidate: then a rare label's negatives are every other training document and, at the
# positives' weight, they push it down more than its few positives lift it (0.3 was best on the
# debtags validation split among 0.03, 0.1, 0.3 and 1). With sampled or mined negatives a
# label's negatives are fewer, and 0.3 there cost Rare-F1 on wordnet-hypernyms and
# gutenberg-lcsh for no other gain.
AUTO_NEGATIVES = {True: 0.3, False: 1.0}


@dataclass
class GameConfig:
    """The game's weights and schedule."""

    alpha: float = 16.0  # weight of curiosity (chosen on debtags validation from 1, 4, 16, 64)
    beta: float = 0.1  # weight of disagreement inside curiosity
    divergence: str = "squared"
    schedule: str = "cyclic"  # or "joint"
    # weight of a negative entry in the curiosity log-likelihood, a positive's being 1 (1 counts
    # every candidate alike, 0 positives only); None: AUTO_NEGATIVES, by how candidates are drawn
    curiosity_negatives: float | None = None

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0:
            raise XmlgameError(
                f"--alpha and --beta must be >= 0, got {self.alpha} and {self.beta}"
            )
        if self.divergence not in DIVERGENCES:
            raise XmlgameError(f"divergence {self.divergence!r}: choose one of {DIVERGENCES}")
        if self.curiosity_negatives is not None and not 0 <= self.curiosity_negatives <= 1:
            raise XmlgameError(
                f"--curiosity-negatives must be in [0, 1], got {self.curiosity_negatives}"
            )
        if self.schedule not in ("cyclic", "joint"):
            raise XmlgameError(f"--schedule {self.schedule!r}: choose cyclic or joint")

    def for_candidates(self, every_label: bool) -> GameConfig:
        """This game with ``curiosity_negatives`` settled: as given, or else by whether every
        label is a candidate for every document (see AUTO_NEGATIVES)."""
        if self.curiosity_negatives is not None:
            return self
        return replace(self, curiosity_negatives=AUTO_NEGATIVES[every_label])

    @property
    def negative_weight(self) -> float:
        if self.curiosity_negatives is None:
            raise XmlgameError("the game's curiosity_negatives is unset: settle it with "
                               "GameConfig.for_candidates before computing payoffs")
        return self.curiosity_negatives


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


def entry_weights(targets: torch.Tensor, config: GameConfig) -> torch.Tensor:
    """The weight of each entry in the curiosity log-likelihood: 1 for a positive,
    ``curiosity_negatives`` for a negative."""
    w = config.negative_weight
    return targets * (1 - w) + w


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
    if config.negative_weight != 1:
        loglik = loglik * entry_weights(pair_targets, config)
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
class SharedPairs:
    """The pairs of a batch whose label has two owners, in pair order (so each player's are a
    block of them), with the constants of their gradients, gathered once per batch.

    ``index`` (S,) are their pair ids and ``peer`` (S,) those of the other owner's pair, at
    position ``peer_pos`` of ``index``; ``weight``/``peer_weight`` (S, 1) are the two fusion
    weights, ``targets`` (S, B) the label's targets, ``curiosity`` (S, 1) the label's
    ``alpha r_l / (B C)`` times, where negatives are weighted apart (S, B), each entry's weight
    (:func:`entry_weights`), and ``push`` (S, 1) the factor of the disagreement term's gradient
    (``2 beta`` or ``beta`` times ``alpha r_l / (B C)``, squared or absolute).
    """

    index: torch.Tensor
    peer: torch.Tensor
    peer_pos: torch.Tensor | None
    weight: torch.Tensor
    peer_weight: torch.Tensor
    targets: torch.Tensor
    curiosity: torch.Tensor
    push: torch.Tensor
    _blocks: dict = field(default_factory=dict, repr=False)

    def block(self, select: slice, n_pairs: int) -> slice:
        """The shared pairs inside a slice of the M pairs, as a slice of this list."""
        lo, hi, _ = select.indices(n_pairs)
        if (lo, hi) not in self._blocks:
            bounds = torch.searchsorted(self.index, torch.tensor([lo, hi]).to(self.index))
            self._blocks[lo, hi] = slice(*bounds.tolist())
        return self._blocks[lo, hi]

    def part(self, keep: torch.Tensor) -> SharedPairs:
        """The shared pairs at positions ``keep`` (sorted) of this list, on their own (their
        peers' positions, which may be outside, are not kept)."""
        return SharedPairs(
            self.index[keep], self.peer[keep], None, self.weight[keep], self.peer_weight[keep],
            self.targets.index_select(0, keep), self.curiosity[keep], self.push[keep],
        )

    def split(self) -> tuple[SharedPairs, SharedPairs]:
        """(first, second): the pairs whose peer comes later in pair order, that is belongs to
        a later player, and those whose peer comes earlier."""
        first = self.peer > self.index
        return (self.part(torch.nonzero(first).squeeze(1)),
                self.part(torch.nonzero(~first).squeeze(1)))


@dataclass
class BatchState:
    """What the cyclic schedule keeps of a batch while players move: no graph, just values.

    Everything here is pair-major, one row per pair and one column per document, so that a
    player's pairs are a block of rows and gathering the pairs of some labels copies whole
    rows: ``logits``/``probs`` are (M, B), ``pair_targets`` (M, B) the targets of each pair's
    label and ``targets`` (C, B) those of each label; ``weights`` (M,) is the fusion weight of
    each pair, ``curiosity`` (M, 1) the ``alpha r_l / (B C)`` of its label and ``loglik_weight``
    that times each entry's weight in the log-likelihood (the same tensor unless negatives are
    weighted apart, then (M, B)). After a player's
    step, :meth:`replace` (or :meth:`rescore`, then :meth:`refresh`) updates its rows. A
    label's fused probability is its owner's probability (one owner, weight 1) or the fusion of
    the two (:class:`SharedPairs`), so it is computed where needed, not kept. ``n_entries`` is
    the B x C that R and C_i divide by: the batch's own, or the whole batch's when these
    documents are one process's part of it.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    targets: torch.Tensor
    pair_targets: torch.Tensor
    curiosity: torch.Tensor
    loglik_weight: torch.Tensor
    shared: SharedPairs
    pairs: Pairs
    n_entries: int
    # (pi, peer, fused slope) of every shared pair, kept until the probabilities change
    _every_shared: tuple | None = field(default=None, repr=False)

    @classmethod
    def start(cls, logits, targets, rarity, pairs: Pairs, players: Players, config: GameConfig,
              n_entries: int | None = None) -> BatchState:
        """From pair logits (M, B) (kept, and updated in place), targets (B, C), rarity (C,)."""
        n_entries = targets.numel() if n_entries is None else n_entries
        with torch.no_grad():
            probs = torch.sigmoid(logits)
            weights = players.fusion_weights(pairs)
            targets = targets.T.contiguous()
            pair_targets = targets.index_select(0, pairs.col)
            curiosity = (rarity[pairs.col] * (config.alpha / n_entries))[:, None]
            loglik_weight = curiosity
            if config.negative_weight != 1:
                loglik_weight = entry_weights(pair_targets, config).mul_(curiosity)
            index = torch.nonzero(pairs.peer >= 0).squeeze(1)
            peer = pairs.peer[index]
            push = curiosity[index] * (config.beta * (2 if config.divergence == "squared" else 1))
            shared = SharedPairs(
                index, peer, torch.searchsorted(index, peer), weights[index, None],
                weights[peer, None], pair_targets.index_select(0, index),
                loglik_weight.index_select(0, index), push,
            )
        return cls(logits, probs, weights, targets, pair_targets, curiosity, loglik_weight,
                   shared, pairs, n_entries)

    @torch.no_grad()
    def replace(self, player: int, logits: torch.Tensor) -> None:
        """A player's new logits (M_i, B) on its pairs."""
        own = self.pairs.player_slices[player]
        self.logits[own] = logits
        torch.sigmoid(logits, out=self.probs[own])
        self._every_shared = None

    @torch.no_grad()
    def rescore(self, ids: torch.Tensor, weights: torch.Tensor, h: torch.Tensor) -> None:
        """The probabilities of the pairs ``ids`` anew, from their rows ``weights``
        (|ids|, D + 1) on documents ``h``; their logits keep their old values until
        :meth:`refresh`, so this is for the pairs later gradients read from ``probs``."""
        self.probs.index_copy_(0, ids, pair_major_logits(weights, h).sigmoid_())
        self._every_shared = None

    @torch.no_grad()
    def refresh(self, logits: torch.Tensor) -> None:
        """Every pair's logits (M, B) anew, after the players' steps."""
        self.logits = logits
        self.probs = torch.sigmoid(logits)
        self._every_shared = None

    def shared_terms(self, block: slice, shared: SharedPairs | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pi, peer probability, d(-R)/dp of the label times B x C), each (rows, B), of the pairs
        ``block`` of ``shared`` (default: every shared pair of the batch). Those of every
        shared pair are kept until the probabilities change, as the final pass of a batch
        reads them twice (pair and fusion gradients)."""
        every = shared is None and block.start == 0 and block.stop == self.shared.index.numel()
        if every and self._every_shared is not None:
            return self._every_shared
        shared = self.shared if shared is None else shared
        pi = self.probs.index_select(0, shared.index[block])
        peer = self.probs.index_select(0, shared.peer[block])
        terms = pi, peer, _fused_slope(shared, block, pi, peer)
        if every:
            self._every_shared = terms
        return terms

    @torch.no_grad()
    def fused(self) -> torch.Tensor:
        """The fused probabilities (C, B) of the batch's candidate labels, before clamping."""
        fused = self.probs.new_zeros(self.targets.shape)
        return fused.index_add_(0, self.pairs.col, self.probs * self.weights[:, None])

    @torch.no_grad()
    def payoffs(self, config: GameConfig) -> Payoffs:
        """R, each C_i and Phi of the current logits: :func:`payoffs` without a graph,
        pair-major (a test checks that the two agree)."""
        fused = self.fused().clamp_(EPS, 1 - EPS)
        bce = F.binary_cross_entropy(fused, self.targets, reduction="sum")
        R = -bce / self.n_entries  # noqa: N806
        n_players = len(self.pairs.player_slices)
        if config.alpha == 0:
            return Payoffs(R, R.new_zeros(n_players), R)
        loglik = -F.binary_cross_entropy_with_logits(self.logits, self.pair_targets,
                                                     reduction="none")
        per_pair = loglik.mul_(self.loglik_weight).sum(1)  # (M,), times alpha r_l / (B C)
        shared = self.shared
        if config.beta > 0 and shared.index.numel():
            own = self.probs.index_select(0, shared.index)
            peer = self.probs.index_select(0, shared.peer)
            disagree = divergence(own, peer, config.divergence).sum(1)
            per_pair.index_add_(0, shared.index,
                                disagree.mul_(self.curiosity[shared.index, 0] * config.beta))
        curiosity = torch.stack([per_pair[s].sum() for s in self.pairs.player_slices])
        curiosity /= config.alpha
        return Payoffs(R, curiosity, R + config.alpha * curiosity.sum())


def pair_major_logits(weights: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Logits (M, B) of pairs with rows ``[w, b]`` (M, D + 1) on documents ``h`` (B, D)."""
    return torch.addmm(weights[:, -1:], weights[:, :-1], h.T)


@torch.no_grad()
def pair_logit_gradient(state: BatchState, config: GameConfig, select: slice,
                        one_owner: torch.Tensor | None = None) -> torch.Tensor:
    """d(-Phi)/dz for the pairs ``select`` (a slice of them), pair-major (|select|, B).

    For a player's own pairs this is also d(-J_i)/dz: peers enter J_i only through sg, so the
    two differ by terms that do not depend on player i. It is the derivative autograd takes
    through :func:`payoffs` (a test checks it), computed without building a graph.

    Most labels have one owner, and for them the fused probability is the player's own (its
    fusion weight is 1), so d(-R)/dz reduces to ``(pi - y) / (B C)`` where p is not clamped:
    every pair is first given that cheap form (:func:`one_owner_gradient`), then the pairs of
    labels with two owners, which depend on their peer, are overwritten with the general one.
    ``one_owner``: the cheap form of these rows, computed earlier (still right for a player
    that has not moved since); it is completed in place and returned.
    """
    grad = one_owner_gradient(state, config, select) if one_owner is None else one_owner
    block = state.shared.block(select, state.pairs.n_pairs)
    if block.stop > block.start:
        rows = state.shared.index[block] - (select.start or 0)
        grad.index_copy_(0, rows, _shared_pair_gradient(state, config, block))
    return grad


@torch.no_grad()
def one_owner_gradient(state: BatchState, config: GameConfig, select: slice) -> torch.Tensor:
    """d(-Phi)/dz (|select|, B) of the pairs ``select`` as if each label had one owner: exact
    for those that do, whose gradient depends on nothing but their own logit."""
    pi = state.probs[select]
    grad = pi - state.pair_targets[select]
    scale = 1.0 / state.n_entries
    # 1 where the clamp of R moves p (R's gradient is cut there), 0 where it leaves p alone:
    # from float operations, which are several times faster here than comparisons
    clamped = pi.clamp(EPS, 1 - EPS).sub_(pi).abs_().sign_()
    if config.alpha == 0:
        return grad.mul_(clamped.sub_(1).mul_(-scale))
    # R's and the weighted log-likelihood's, both (pi - y) times a factor:
    # (pi - y)(c + inside / (B C)), c the entry's loglik_weight
    return grad.mul_(clamped.mul_(-scale).add_(state.loglik_weight[select] + scale))


def _fused_slope(shared: SharedPairs, block: slice, pi: torch.Tensor, peer: torch.Tensor
                 ) -> torch.Tensor:
    """d(-R)/dp (rows, B) at the labels of the pairs ``block`` of ``shared``, from their
    owners' probabilities, times the B x C that R divides by (the callers divide); 0 where p
    is clamped."""
    raw = torch.addcmul(pi * shared.weight[block], peer, shared.peer_weight[block])
    fused = raw.clamp(EPS, 1 - EPS)
    slope = (fused - shared.targets[block]).div_(torch.addcmul(fused, fused, fused, value=-1))
    # cut (1 where the clamp moved p, 0 elsewhere) from float operations, as in
    # one_owner_gradient: a comparison and a multiplication by its result cost several times more
    cut = raw.sub_(fused).abs_().sign_()
    return slope.addcmul_(slope, cut, value=-1)


@torch.no_grad()
def shared_pair_gradient(state: BatchState, config: GameConfig, shared: SharedPairs
                         ) -> torch.Tensor:
    """d(-Phi)/dz (pair-major) of every pair of ``shared`` (a part of the batch's
    :class:`SharedPairs`), at the probabilities ``state`` holds now."""
    return _shared_pair_gradient(state, config, slice(0, shared.index.numel()), shared)


def _shared_pair_gradient(state: BatchState, config: GameConfig, block: slice,
                          shared: SharedPairs | None = None) -> torch.Tensor:
    """d(-Phi)/dz (pair-major) for the pairs ``block`` (a slice) of ``shared`` (default: the
    batch's :class:`SharedPairs`): R through the fused probability, the log-likelihood and
    the disagreement with the peer."""
    pi, peer, fused_slope = state.shared_terms(block, shared)
    shared = state.shared if shared is None else shared
    slope = torch.addcmul(pi, pi, pi, value=-1)  # dpi/dz = pi (1 - pi)
    grad = fused_slope * (shared.weight[block] / state.n_entries)
    if config.alpha > 0 and config.beta > 0:  # R and the disagreement both scale with slope
        diff = pi - peer
        d = diff if config.divergence == "squared" else diff.sign_()
        grad.addcmul_(d, shared.push[block], value=-1)
    grad.mul_(slope)
    if config.alpha > 0:
        grad.addcmul_(pi - shared.targets[block], shared.curiosity[block])
    return grad


@torch.no_grad()
def fusion_logit_gradient(state: BatchState) -> torch.Tensor:
    """d(-Phi)/d(fusion logits) of each pair, (M,): only R depends on fusion.

    With ``a = softmax`` over a label's owners and ``g_m = dR/da_m``, the logit gradient is
    ``a_m (g_m - sum_o a_o g_o)``; single-owner labels (``a = 1``) get zero, so only the pairs
    of labels with two owners are computed.
    """
    shared = state.shared
    grad = state.weights.new_zeros(state.pairs.n_pairs)
    if shared.index.numel() == 0:
        return grad
    pi, _, fused_slope = state.shared_terms(slice(0, shared.index.numel()))
    minus_g = (fused_slope * pi).sum(1).div_(state.n_entries)  # -g_m
    a = shared.weight[:, 0]
    minus_ag = a * minus_g
    return grad.index_copy_(0, shared.index, minus_ag - a * (minus_ag + minus_ag[shared.peer_pos]))
