"""The game: stop-gradient, potential property, closed-form gradients, and the rarity weight.

Every check is against autograd through :func:`xmlgame.game.payoffs`, the definitional
implementation, in float64 on small random problems with overlapping shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from xmlgame.errors import XmlgameError
from xmlgame.game import (
    AUTO_NEGATIVES,
    BatchState,
    GameConfig,
    divergence,
    fusion_logit_gradient,
    pair_logit_gradient,
    payoffs,
)
from xmlgame.players import Pairs, Players
from xmlgame.shards import Shards, make_shards

B, D, L, N = 5, 4, 14, 3  # batch, hidden size, labels, players

GAMES = [
    GameConfig(alpha=0.7, beta=0.3, curiosity_negatives=1.0),
    GameConfig(alpha=2.0, beta=1.5, divergence="absolute", curiosity_negatives=1.0),
    GameConfig(alpha=0.0, beta=0.3, curiosity_negatives=1.0),
    GameConfig(alpha=1.0, beta=0.0, curiosity_negatives=0.3),
    GameConfig(alpha=1.5, beta=0.4, curiosity_negatives=0.0),
    GameConfig(alpha=1.5, beta=0.4, curiosity_negatives=0.25),
]


def game_id(config: GameConfig) -> str:
    return (f"alpha{config.alpha}-beta{config.beta}-{config.divergence}"
            f"-neg{config.curiosity_negatives}")


@dataclass
class World:
    players: Players
    h: torch.Tensor  # (B, D)
    pairs: Pairs
    targets: torch.Tensor  # (B, C)
    rarity: torch.Tensor  # (C,)

    def logits(self) -> torch.Tensor:
        return self.players.logits(self.h, self.pairs)

    def tables(self) -> list[torch.Tensor]:
        return [t.weight for t in self.players.tables]


def make_world(seed: int = 0, n_players: int = N, overlap: float = 0.5,
               candidates: int | None = 10) -> World:
    """Random players (float64, non-uniform fusion), documents, targets and rarities."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    shards = make_shards(L, n_players, overlap, seed)
    players = Players(shards, D, sparse=False).double()
    with torch.no_grad():
        for table in players.tables:
            table.weight.normal_(0, 0.7)
        players.fusion.weight.normal_(0, 1.0)
    labels = np.arange(L) if candidates is None else np.sort(rng.choice(L, candidates, False))
    pairs = players.pairs(torch.from_numpy(labels))
    targets = torch.from_numpy((rng.random((B, len(labels))) < 0.4).astype(np.float64))
    counts = rng.integers(0, 50, size=len(labels))
    rarity = torch.from_numpy(1.0 / (1.0 + counts))
    return World(players, torch.randn(B, D, dtype=torch.float64), pairs, targets, rarity)


def grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d output / d inputs, zeros where an input does not reach the output."""
    found = torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found)]


def test_world_has_overlap_and_several_players_per_batch():
    world = make_world()
    assert (world.pairs.peer >= 0).sum() >= 4
    sizes = [s.stop - s.start for s in world.pairs.player_slices]
    assert all(size > 0 for size in sizes)


# --------------------------------------------------------------------------------------------
# the stop-gradient


@pytest.mark.parametrize("divergence_kind", ["squared", "absolute"])
def test_curiosity_gives_peers_no_gradient(divergence_kind):
    world = make_world(seed=1)
    config = GameConfig(alpha=1.0, beta=2.0, divergence=divergence_kind, curiosity_negatives=1.0)
    result = payoffs(world.logits(), world.targets, world.rarity, world.pairs, world.players,
                     config)
    tables = world.tables()
    for i in range(N):
        g = grads(result.C[i], tables)
        assert g[i].abs().sum() > 0, "a player's curiosity must move its own table"
        for j in range(N):
            if j != i:
                assert torch.equal(g[j], torch.zeros_like(g[j])), (i, j)


def test_without_stop_gradient_peers_would_get_gradient():
    """The same disagreement term with a live peer does reach the peers: the check above bites."""
    world = make_world(seed=1)
    pairs = world.pairs
    probs = torch.sigmoid(world.logits())
    tables = world.tables()
    for i in range(N):
        own = torch.arange(pairs.player_slices[i].start, pairs.player_slices[i].stop)
        own = own[pairs.peer[own] >= 0]
        assert own.numel() > 0
        live = divergence(probs[:, own], probs[:, pairs.peer[own]], "squared").sum()
        g = grads(live, tables)
        assert any(g[j].abs().sum() > 0 for j in range(N) if j != i)


# --------------------------------------------------------------------------------------------
# the potential


@pytest.mark.parametrize("config", [g for g in GAMES if g.alpha > 0], ids=game_id)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_player_gradient_of_j_equals_gradient_of_phi(config, seed):
    world = make_world(seed=seed)
    result = payoffs(world.logits(), world.targets, world.rarity, world.pairs, world.players,
                     config)
    tables = world.tables()
    for i in range(N):
        g_j = grads(result.J(i, config.alpha), [tables[i]])[0]
        g_phi = grads(result.phi, [tables[i]])[0]
        assert g_j.abs().sum() > 0
        torch.testing.assert_close(g_j, g_phi, rtol=1e-12, atol=1e-14)
        # other players' curiosity does depend on player i's rows (their own pairs' peers):
        # the equality above holds because that dependence is cut, not because it is absent
        g_r = grads(result.R, [tables[i]])[0]
        assert not torch.allclose(g_j, g_r)


# --------------------------------------------------------------------------------------------
# closed-form gradients against autograd


def autograd_logit_gradients(world: World, config: GameConfig):
    """(-dPhi/dz, [-dJ_i/dz for each player]) over the (B, M) pair logits z."""
    logits = world.logits().detach().requires_grad_(True)
    result = payoffs(logits, world.targets, world.rarity, world.pairs, world.players, config)
    d_phi = -grads(result.phi, [logits])[0]
    d_j = [-grads(result.J(i, config.alpha), [logits])[0] for i in range(N)]
    return logits.detach(), d_phi, d_j


@pytest.mark.parametrize("config", GAMES, ids=game_id)
@pytest.mark.parametrize("candidates", [10, None], ids=["sampled", "all-labels"])
def test_pair_gradient_matches_autograd_on_the_full_problem(config, candidates):
    world = make_world(seed=3, candidates=candidates)
    logits, d_phi, d_j = autograd_logit_gradients(world, config)
    state = BatchState.start(logits.T.contiguous(), world.targets, world.rarity, world.pairs,
                             world.players, config)
    for i, own in enumerate(world.pairs.player_slices):
        closed = pair_logit_gradient(state, config, own).T
        assert closed.abs().sum() > 0
        torch.testing.assert_close(closed, d_j[i][:, own], rtol=1e-10, atol=1e-14)
    closed_all = pair_logit_gradient(state, config, slice(None)).T
    torch.testing.assert_close(closed_all, d_phi, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("config", GAMES, ids=game_id)
def test_pair_gradient_matches_autograd_where_probabilities_saturate(config):
    """Logits far from 0 push probabilities past the clamp of R (1e-6 from 0 or 1), where R's
    gradient is cut: the closed form must cut it on the same entries, single-owner or not."""
    world = make_world(seed=4)
    with torch.no_grad():
        for table in world.players.tables:
            table.weight.mul_(16.0)
    logits, d_phi, _ = autograd_logit_gradients(world, config)
    probs = torch.sigmoid(logits)
    saturated = (probs < 1e-6) | (probs > 1 - 1e-6)
    assert saturated.float().mean() > 0.2 and (~saturated).any()
    state = BatchState.start(logits.T.contiguous(), world.targets, world.rarity, world.pairs,
                             world.players, config)
    shared = state.shared  # the fused probability of some two-owner labels is clamped too
    own, peer = state.probs[shared.index], state.probs[shared.peer]
    fused = shared.weight * own + shared.peer_weight * peer
    clamped = (fused < 1e-6) | (fused > 1 - 1e-6)
    assert clamped.any() and (~clamped).any()
    closed = pair_logit_gradient(state, config, slice(None)).T
    torch.testing.assert_close(closed, d_phi, rtol=1e-10, atol=1e-14)
    # the fusion weights' gradient is cut on the same entries
    result = payoffs(logits, world.targets, world.rarity, world.pairs, world.players, config)
    d_fusion = -grads(result.phi, [world.players.fusion.weight])[0]
    expected = d_fusion[world.pairs.labels[world.pairs.col], world.pairs.pos]
    torch.testing.assert_close(fusion_logit_gradient(state), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("config", GAMES, ids=game_id)
def test_fusion_gradient_matches_autograd(config):
    world = make_world(seed=5)
    fusion = world.players.fusion.weight  # (L, 2)
    result = payoffs(world.logits().detach(), world.targets, world.rarity, world.pairs,
                     world.players, config)
    d_fusion = -grads(result.phi, [fusion])[0]
    pairs = world.pairs
    expected = d_fusion[pairs.labels[pairs.col], pairs.pos]  # (M,)
    logits = world.logits().detach().T.contiguous()  # pair-major (M, B)
    state = BatchState.start(logits, world.targets, world.rarity, pairs, world.players, config)
    closed = fusion_logit_gradient(state)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(closed, expected, rtol=1e-10, atol=1e-14)
    single = pairs.peer < 0
    assert single.any() and torch.equal(closed[single], torch.zeros_like(closed[single]))


@pytest.mark.parametrize("config", GAMES, ids=game_id)
def test_batch_state_payoffs_equal_the_graph_ones(config):
    """The pair-major payoffs the cyclic schedule logs equal :func:`payoffs`, also after a
    player moved (its rows replaced)."""
    world = make_world(seed=7)
    logits = world.logits().detach()
    state = BatchState.start(logits.T.contiguous(), world.targets, world.rarity, world.pairs,
                             world.players, config)
    own = world.pairs.player_slices[1]
    moved = logits.T.contiguous()
    moved[own] -= 1.5
    state.replace(1, moved[own])
    expected = payoffs(moved.T, world.targets, world.rarity, world.pairs, world.players, config)
    found = state.payoffs(config)
    for a, b in ((found.R, expected.R), (found.C, expected.C), (found.phi, expected.phi)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert config.alpha == 0 or (found.C != 0).all()


@pytest.mark.parametrize("config", GAMES[:2], ids=game_id)
def test_closed_form_follows_player_moves(config):
    """After :meth:`BatchState.replace`, the gradients are those of the updated logits."""
    world = make_world(seed=6)
    logits = world.logits().detach()
    state = BatchState.start(logits.T.contiguous(), world.targets, world.rarity, world.pairs,
                             world.players, config)
    own = world.pairs.player_slices[0]
    moved = logits.T.contiguous()  # pair-major (M, B)
    moved[own] += torch.randn(own.stop - own.start, B, dtype=torch.float64)
    state.replace(0, moved[own])
    fresh = BatchState.start(moved.clone(), world.targets, world.rarity, world.pairs,
                             world.players, config)
    torch.testing.assert_close(state.probs, fresh.probs, rtol=1e-14, atol=1e-15)
    for select in [world.pairs.player_slices[1], slice(None)]:
        torch.testing.assert_close(pair_logit_gradient(state, config, select),
                                   pair_logit_gradient(fresh, config, select))
    torch.testing.assert_close(fusion_logit_gradient(state), fusion_logit_gradient(fresh))


# --------------------------------------------------------------------------------------------
# rarity


def two_label_world(counts: tuple[int, int]):
    """One player, one document positive for two labels predicted alike (logit -2 each)."""
    shards = Shards.from_owners(np.array([[0, -1], [0, -1]]), 1)
    players = Players(shards, D, sparse=False).double()
    pairs = players.pairs(torch.arange(2))
    logits = torch.full((1, 2), -2.0, dtype=torch.float64, requires_grad=True)
    targets = torch.ones(1, 2, dtype=torch.float64)
    rarity = 1.0 / (1.0 + torch.tensor(counts, dtype=torch.float64))
    return players, pairs, logits, targets, rarity


def test_rare_false_negative_gets_more_curiosity_gradient():
    players, pairs, logits, targets, rarity = two_label_world((1, 1000))
    config = GameConfig(alpha=1.0, beta=0.1, curiosity_negatives=1.0)
    result = payoffs(logits, targets, rarity, pairs, players, config)
    curiosity = grads(result.C[0], [logits])[0][0]  # (2,) over [rare, frequent]
    assert curiosity[0] > 0 and curiosity[1] > 0  # both pushed up: they are positives
    assert curiosity[0] > 100 * curiosity[1]
    # so the potential's gradient too
    phi = grads(result.phi, [logits])[0][0]
    assert phi[0] > phi[1]
    # the closed form agrees
    state = BatchState.start(logits.detach().T.contiguous(), targets, rarity, pairs, players,
                             config)
    closed = -pair_logit_gradient(state, config, slice(None))[:, 0]
    torch.testing.assert_close(closed, phi)


def test_without_curiosity_rarity_changes_nothing():
    players, pairs, logits, targets, rarity = two_label_world((1, 1000))
    config = GameConfig(alpha=0.0, curiosity_negatives=1.0)
    result = payoffs(logits, targets, rarity, pairs, players, config)
    phi = grads(result.phi, [logits])[0][0]
    assert phi[0] > 0
    assert phi[0] == phi[1]
    state = BatchState.start(logits.detach().T.contiguous(), targets, rarity, pairs, players,
                             config)
    closed = pair_logit_gradient(state, config, slice(None))[:, 0]
    assert closed[0] == closed[1]


def test_curiosity_negatives_is_settled_by_how_candidates_are_drawn():
    assert GameConfig().for_candidates(True).curiosity_negatives == AUTO_NEGATIVES[True]
    assert GameConfig().for_candidates(False).curiosity_negatives == AUTO_NEGATIVES[False]
    assert AUTO_NEGATIVES[True] < 1 == AUTO_NEGATIVES[False]
    given = GameConfig(curiosity_negatives=0.5)
    assert given.for_candidates(True) == given == given.for_candidates(False)
    with pytest.raises(XmlgameError, match="for_candidates"):
        _ = GameConfig().negative_weight
