"""Label shards: ownership, overlap, balance, determinism, edge cases and the saved form."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from xmlgame.encoders import EncoderConfig
from xmlgame.errors import XmlgameError
from xmlgame.shards import Shards, make_shards
from xmlgame.train import TrainConfig, train

CASES = [(10, 3, 0.2), (101, 6, 0.2), (7, 2, 0.5), (50, 4, 1.0), (1000, 6, 0.33), (3, 3, 0.34)]


def check_consistent(shards: Shards) -> None:
    """owner_row and player_labels describe the same assignment as owner_player."""
    for label in range(shards.n_labels):
        for position in range(2):
            player = shards.owner_player[label, position]
            row = shards.owner_row[label, position]
            if player < 0:
                assert row == -1
            else:
                assert shards.player_labels[player][row] == label
    sizes = sum(len(labels) for labels in shards.player_labels)
    assert sizes == (shards.owner_player >= 0).sum()


@pytest.mark.parametrize("n_labels, n_players, rho", CASES)
def test_every_label_has_an_owner(n_labels, n_players, rho):
    shards = make_shards(n_labels, n_players, rho, seed=0)
    assert shards.n_labels == n_labels and shards.n_players == n_players
    assert (shards.owner_player[:, 0] >= 0).all()
    owned = np.unique(np.concatenate(shards.player_labels))
    assert np.array_equal(owned, np.arange(n_labels))
    check_consistent(shards)


@pytest.mark.parametrize("n_labels, n_players, rho", CASES)
def test_overlap_ratio_is_the_rounded_fraction(n_labels, n_players, rho):
    shards = make_shards(n_labels, n_players, rho, seed=3)
    assert shards.overlap_ratio() == pytest.approx(round(rho * n_labels) / n_labels)
    assert shards.overlapping.sum() == round(rho * n_labels)


@pytest.mark.parametrize("n_labels, n_players, rho", CASES)
def test_second_owner_differs_from_first(n_labels, n_players, rho):
    shards = make_shards(n_labels, n_players, rho, seed=5)
    shared = shards.overlapping
    assert (shards.owner_player[shared, 1] != shards.owner_player[shared, 0]).all()
    assert (shards.owner_player[shared, 1] < n_players).all()
    assert (shards.owner_player[~shared, 1] == -1).all()


@pytest.mark.parametrize("n_labels, n_players, rho", CASES)
def test_first_owner_shards_are_balanced(n_labels, n_players, rho):
    shards = make_shards(n_labels, n_players, rho, seed=7)
    first = np.bincount(shards.owner_player[:, 0], minlength=n_players)
    assert first.max() - first.min() <= 1
    assert first.sum() == n_labels


def test_second_owners_are_spread_over_players():
    shards = make_shards(6000, 6, 0.5, seed=0)
    second = shards.owner_player[shards.overlapping, 1]
    counts = np.bincount(second, minlength=6)
    assert counts.min() > 0.8 * counts.mean()  # 500 expected each: no player is skipped


def test_same_seed_same_shards_other_seed_other_shards():
    a = make_shards(200, 5, 0.2, seed=11)
    b = make_shards(200, 5, 0.2, seed=11)
    c = make_shards(200, 5, 0.2, seed=12)
    assert np.array_equal(a.owner_player, b.owner_player)
    assert np.array_equal(a.owner_row, b.owner_row)
    assert not np.array_equal(a.owner_player, c.owner_player)


def test_one_player_has_no_overlap_even_with_rho():
    shards = make_shards(20, 1, 0.5, seed=0)
    assert shards.overlap_ratio() == 0.0
    assert (shards.owner_player[:, 0] == 0).all()
    assert np.array_equal(shards.player_labels[0], np.arange(20))
    check_consistent(shards)


def test_rho_zero_has_no_overlap():
    shards = make_shards(20, 4, 0.0, seed=0)
    assert shards.overlap_ratio() == 0.0
    assert (shards.owner_player[:, 1] == -1).all()


@pytest.mark.parametrize("n_players, rho", [(0, 0.2), (-2, 0.2), (3, -0.1), (3, 1.5)])
def test_invalid_players_or_overlap_raise(n_players, rho):
    with pytest.raises(XmlgameError, match="--players|--overlap"):
        make_shards(10, n_players, rho, seed=0)


@pytest.mark.parametrize("players, overlap", [(0, 0.2), (2, 1.5), (2, -0.5)])
def test_train_config_rejects_bad_shards(players, overlap):
    # rejected when the config is made, before a run folder is written
    with pytest.raises(XmlgameError, match="--players|--overlap"):
        TrainConfig(players=players, overlap=overlap)


def test_save_load_round_trip(tmp_path):
    shards = make_shards(37, 4, 0.3, seed=2)
    shards.save(tmp_path / "shards.npz")
    loaded = Shards.load(tmp_path / "shards.npz")
    assert loaded.n_players == 4
    assert np.array_equal(loaded.owner_player, shards.owner_player)
    assert np.array_equal(loaded.owner_row, shards.owner_row)
    assert len(loaded.player_labels) == len(shards.player_labels)
    for mine, theirs in zip(loaded.player_labels, shards.player_labels):
        assert np.array_equal(mine, theirs)


def test_round_trip_keeps_players_that_own_nothing(tmp_path):
    shards = make_shards(3, 5, 0.0, seed=0)
    shards.save(tmp_path / "shards.npz")
    loaded = Shards.load(tmp_path / "shards.npz")
    assert loaded.n_players == 5
    assert [len(x) for x in loaded.player_labels] == [len(x) for x in shards.player_labels]


def test_more_players_than_labels(caplog):
    with caplog.at_level(logging.WARNING, logger="xmlgame.shards"):
        shards = make_shards(4, 7, 0.5, seed=0)
    assert "3 players will own no label" in caplog.text
    sizes = [len(labels) for labels in shards.player_labels]
    assert sizes.count(0) >= 1
    assert (shards.owner_player[:, 0] >= 0).all()
    assert shards.overlapping.sum() == 2
    check_consistent(shards)


def test_training_runs_with_more_players_than_labels(small_toy, tmp_path, caplog):
    config = TrainConfig(
        players=8, overlap=0.34, epochs=1, batch_size=32,
        encoder=EncoderConfig(dim=16, min_df=1),
    )
    with caplog.at_level(logging.WARNING, logger="xmlgame.shards"):
        results = train(small_toy, config, tmp_path / "run", progress=False)
    assert "players will own no label" in caplog.text
    shards = Shards.load(tmp_path / "run" / "shards.npz")
    assert any(len(labels) == 0 for labels in shards.player_labels)
    assert results["epochs_run"] == 1
    assert 0.0 <= results["test"]["p@1"] <= 1.0
    assert (tmp_path / "run" / "predictions.npz").exists()
