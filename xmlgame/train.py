"""Training a CD-GTMLL run: the cyclic (or joint) game over batches, validation, checkpoints.

``train(dataset, config)`` writes a run folder (see :mod:`xmlgame.model` for the files it shares
with prediction) plus::

    log.jsonl            one JSON line per epoch: Phi, R, each C_i, validation metrics, gradient
                         norms on head and tail labels, tail labels each player leads, time, memory
    checkpoint/          the last finished epoch: weights, optimizer states, RNG and loop state
    predictions.npz      top-k test predictions of the selected model (read by `xmlgame eval`)
    metrics.json         the selected model's test metrics

Each batch (cyclic schedule): the encoder runs once; players update one after another on their
own objective ``J_i`` using the cached ``h(x)`` (player ``i + 1`` sees player ``i``'s new
predictions; :func:`player_steps` takes them as one update over all players that equals that
order); then the encoder and the fusion weights take a step on ``Phi`` with all players'
fresh logits. The ``joint`` schedule takes one step on ``Phi`` for everything.

A validation split carved from the training data (seeded) selects the best epoch and stops
training early; the test split is touched once, at the end.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from xmlgame.allocator import keep_batch_buffers
from xmlgame.dataset import PreparedDataset
from xmlgame.distributed import Communicator
from xmlgame.encoders import EncoderConfig, SplitFeatures, TfidfVocabulary, batch_inputs
from xmlgame.errors import XmlgameError
from xmlgame.game import (
    BatchState,
    GameConfig,
    fusion_logit_gradient,
    one_owner_gradient,
    pair_logit_gradient,
    pair_major_logits,
    payoffs,
    shared_pair_gradient,
)
from xmlgame.metrics import TopK, compute_metrics
from xmlgame.mining import VECTORS, Shortlister, frequent_labels
from xmlgame.model import XmlModel, dataset_fingerprint, label_prior
from xmlgame.optim import RowAdam, StackedMoments, set_row_gradient
from xmlgame.parallel import (
    MIXED_PRECISION,
    BatchShare,
    EncoderPass,
    Parallel,
    check_launch,
    label_parallel_step,
)
from xmlgame.paths import write_json
from xmlgame.players import Pairs
from xmlgame.shards import make_shards
from xmlgame.shortlist import IndexConfig

logger = logging.getLogger(__name__)

VALIDATION_METRICS = ("p@1", "p@3", "p@5", "psp@1", "psp@3", "psp@5", "rare-f1@5")


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; saved in run.json."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    game: GameConfig = field(default_factory=GameConfig)
    players: int = 6
    overlap: float = 0.2
    epochs: int = 8
    batch_size: int = 256
    lr_encoder: float = 1e-2
    lr_players: float = 1e-3
    lr_fusion: float = 1e-2
    lr_transformer: float = 3e-5
    full_candidates_max: int = 4096  # score every label when L is at most this
    negatives: int = 2048  # sampled negatives per batch beyond that
    # beyond full_candidates_max, the label index (see xmlgame.mining) shortlists labels:
    shortlist_k: int = 8  # hard negatives mined per document from each index (0: none)
    predict_shortlist: int = 100  # labels scored per document at prediction (0: every label)
    shortlist_weight: float = 0.0  # weight of the centroid similarity in prediction scores
    # the labels most frequent in training, scored for every document besides its shortlist
    shortlist_frequent: int = 1000
    # label centroids, the players' heads, or both (see mining); auto: both while the index is
    # exact, centroids alone once it is approximate (the heads resist approximate search)
    index_vectors: str = "auto"
    index: IndexConfig = field(default_factory=IndexConfig)
    val_fraction: float = 0.05
    val_max: int = 5_000
    patience: int = 2
    select_metric: str = "psp@5+p@1"
    rare_threshold: int = 10
    predict_k: int = 20
    measure_every: int = 4  # batches between measurements of Phi, R, C_i and gradient norms
    seed: int = 0
    # how to train, not what: a resumed run may change these (see xmlgame.parallel)
    label_parallel: bool = False  # several processes: each holds a block of the players
    grad_accum: int = 1  # micro-batches per batch, the encoder's activations held for one
    mixed_precision: str = "no"  # or "bf16": the encoder's forward on GPUs

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        if isinstance(self.game, dict):
            game = dict(self.game)
            # runs saved before negatives could be weighted apart named the two ends
            targets = game.pop("curiosity_targets", None)
            if targets is not None:
                game["curiosity_negatives"] = 0.0 if targets == "positives" else 1.0
            self.game = GameConfig(**game)
        if isinstance(self.index, dict):
            self.index = IndexConfig(**self.index)
        if min(self.shortlist_k, self.predict_shortlist, self.negatives,
               self.shortlist_frequent) < 0:
            raise XmlgameError(
                "--shortlist-k, --predict-shortlist, --negatives and --shortlist-frequent must "
                f"be >= 0, got {self.shortlist_k}, {self.predict_shortlist}, {self.negatives} "
                f"and {self.shortlist_frequent}"
            )
        if self.index_vectors not in (*VECTORS, "auto"):
            raise XmlgameError(
                f"--index-vectors {self.index_vectors!r}: choose one of "
                f"{', '.join(VECTORS)} or auto"
            )
        if not 0.0 <= self.shortlist_weight <= 1.0:
            raise XmlgameError(
                f"--shortlist-weight must be between 0 and 1, got {self.shortlist_weight}"
            )
        if self.players < 1:
            raise XmlgameError(f"--players must be at least 1, got {self.players}")
        if not 0.0 <= self.overlap <= 1.0:
            raise XmlgameError(f"--overlap must be between 0 and 1, got {self.overlap}")
        if self.epochs < 1 or self.batch_size < 1:
            raise XmlgameError(
                f"--epochs and --batch-size must be at least 1, got {self.epochs} and "
                f"{self.batch_size}"
            )
        if self.predict_k < 5:  # validation and test report metrics at k = 5
            raise XmlgameError(f"predict_k must be at least 5, got {self.predict_k}")
        if self.measure_every < 1:
            raise XmlgameError(f"measure_every must be at least 1, got {self.measure_every}")
        if not 0 < self.val_fraction < 0.5:
            raise XmlgameError("--val-fraction must be in (0, 0.5)")
        self.check_execution()
        for name in self.select_metric.split("+"):
            if name not in VALIDATION_METRICS:
                raise XmlgameError(
                    f"--select-metric part {name!r} is not one of {', '.join(VALIDATION_METRICS)}"
                )

    def check_execution(self) -> None:
        if self.grad_accum < 1:
            raise XmlgameError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise XmlgameError(
                f"--mixed-precision {self.mixed_precision!r}: choose one of "
                f"{', '.join(MIXED_PRECISION)}"
            )
        for option, used in (("--label-parallel", self.label_parallel),
                             ("--grad-accum > 1", self.grad_accum > 1)):
            if used and self.game.schedule != "cyclic":
                raise XmlgameError(
                    f"{option} works with the cyclic schedule only, not --schedule "
                    f"{self.game.schedule}; use the cyclic schedule or leave it out"
                )


EXECUTION_OPTIONS = ("label_parallel", "grad_accum", "mixed_precision")


# --------------------------------------------------------------------------------------------
# data


@dataclass
class TrainData:
    """The featurized training, validation and test documents with their label matrices."""

    train: SplitFeatures
    val: SplitFeatures
    test: SplitFeatures
    Y_train: sp.csr_matrix  # noqa: N815
    Y_val: sp.csr_matrix  # noqa: N815
    Y_test: sp.csr_matrix  # noqa: N815
    train_counts: np.ndarray  # documents per label in the training part (validation excluded)


def split_validation(n_docs: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    n_val = max(1, min(config.val_max, int(round(config.val_fraction * n_docs))))
    order = np.random.default_rng(config.seed + 7919).permutation(n_docs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def build_vocabulary(dataset: PreparedDataset, config: EncoderConfig) -> TfidfVocabulary | None:
    if config.kind == "transformer":
        return None
    if dataset.train.texts is not None:
        logger.info("building the bag-of-words vocabulary from %d texts", len(dataset.train))
        return TfidfVocabulary.fit_texts(
            dataset.train.texts, config.max_features, config.min_df, config.ngrams
        )
    if dataset.train.X is None:
        raise XmlgameError(f"dataset {dataset.name} has neither texts nor features")
    return TfidfVocabulary.fit_features(dataset.train.X)


def featurize_dataset(model: XmlModel, dataset: PreparedDataset, config: TrainConfig) -> TrainData:
    parts = {}
    for split in ("train", "test"):
        s = dataset.split(split)
        texts = list(s.texts) if s.texts is not None else None
        parts[split] = model.featurize(texts, s.X, dataset_fingerprint(dataset, split))
    train_rows, val_rows = split_validation(len(parts["train"]), config)
    Y = dataset.train.Y  # noqa: N806
    Y_train = Y[train_rows]  # noqa: N806
    return TrainData(
        train=parts["train"].subset(train_rows),
        val=parts["train"].subset(val_rows),
        test=parts["test"],
        Y_train=Y_train,
        Y_val=Y[val_rows],
        Y_test=dataset.test.Y,
        train_counts=np.bincount(Y_train.indices, minlength=dataset.n_labels),
    )


class Candidates:
    """The candidate labels of each batch.

    Every label when there are at most ``full_candidates_max``; otherwise the union over the
    batch's documents of their positives, their mined hard negatives (``hard``: the top
    ``shortlist_k`` labels of each training document in the label index, set by each refresh),
    and ``negatives`` labels sampled uniformly. A document thus also meets the other documents'
    hard negatives, at no extra cost, as every candidate is scored for the whole batch.
    """

    def __init__(self, players, n_labels: int, config: TrainConfig):
        self.n_labels = n_labels
        self.full = n_labels <= config.full_candidates_max
        self.negatives = config.negatives
        self.all_pairs: Pairs | None = players.pairs(torch.arange(n_labels)) if self.full else None
        self.players = players
        self.mine_k = 0 if self.full else config.shortlist_k
        self.hard: np.ndarray | None = None  # int32 (n_train, mine_k), set by each refresh

    def describe(self) -> str:
        if self.full:
            return "all labels"
        mined = f"{self.mine_k} mined per document + " if self.mine_k else ""
        return f"positives + {mined}{self.negatives} sampled"

    def select(self, Y_batch: sp.csr_matrix, rng: np.random.Generator,  # noqa: N803
               rows: np.ndarray | None = None):
        """(pairs, dense targets (B, C)) for a batch: its label rows and training row ids."""
        if self.full:
            return self.all_pairs, torch.from_numpy(Y_batch.toarray())
        parts = [Y_batch.indices, rng.integers(0, self.n_labels, size=self.negatives)]
        if self.hard is not None and rows is not None:
            mined = self.hard[rows].ravel()
            parts.append(mined[mined >= 0])
        labels = np.unique(np.concatenate(parts))
        columns = np.searchsorted(labels, Y_batch.indices)
        targets = sp.csr_matrix(
            (Y_batch.data, columns, Y_batch.indptr), shape=(Y_batch.shape[0], len(labels))
        )
        pairs = self.players.pairs(torch.from_numpy(labels))
        return pairs, torch.from_numpy(targets.toarray())


# --------------------------------------------------------------------------------------------
# optimisation


class Optimizers:
    """One sparse Adam per player table, one for fusion, and the encoder's (sparse + dense)."""

    def __init__(self, model: XmlModel, config: TrainConfig):
        players = model.players
        self.players = [
            RowAdam(list(t.parameters()), lr=config.lr_players)
            if t.num_embeddings else None
            for t in players.tables
        ]
        # the players' moments stacked, for steps over every player at once (one process
        # holding every player; label-parallel training steps player by player)
        self.moments = StackedMoments(self.players, list(players.tables)) \
            if len(players.held) == players.n_players else None
        self.fusion = RowAdam(list(players.fusion.parameters()), lr=config.lr_fusion)
        encoder = model.encoder
        self.encoder = []
        if encoder.sparse_parameters():
            self.encoder.append(
                RowAdam(encoder.sparse_parameters(), lr=config.lr_encoder)
            )
        dense = encoder.dense_parameters()
        if dense:
            transformer = {id(p) for p in encoder.transformer.parameters()} \
                if encoder.transformer is not None else set()
            groups = [
                {"params": [p for p in dense if id(p) not in transformer],
                 "lr": config.lr_encoder},
                {"params": [p for p in dense if id(p) in transformer],
                 "lr": config.lr_transformer},
            ]
            groups = [g for g in groups if g["params"]]
            self.encoder.append(torch.optim.AdamW(groups, weight_decay=0.0))

    def all(self) -> list:
        return [o for o in self.players if o is not None] + [self.fusion] + self.encoder

    def state_dict(self) -> list:
        return [o.state_dict() for o in self.all()]

    def load_state_dict(self, states: list) -> None:
        for optimizer, state in zip(self.all(), states):
            optimizer.load_state_dict(state)
        self.restack()

    def restack(self) -> None:
        """After the players' states were loaded: stack them again (see StackedMoments)."""
        if self.moments is not None:
            self.moments.stack()


def row_gradient_norms(table: torch.nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, gradient norm of each touched row) of a table's sparse or dense gradient."""
    grad = table.weight.grad
    if not grad.is_sparse:
        norms = grad.norm(dim=1)
        rows = torch.nonzero(norms).squeeze(1)
        return rows, norms[rows]
    grad = grad.coalesce()
    return grad.indices()[0], grad.values().norm(dim=1)


class GradientProbe:
    """Mean gradient norm of player rows on head versus tail labels, over an epoch."""

    def __init__(self, shards, train_counts: np.ndarray, rare_threshold: int):
        seen = train_counts[train_counts > 0]
        head_min = np.quantile(seen, 0.9) if len(seen) else np.inf
        kinds = np.zeros(len(train_counts), dtype=np.int64)  # 0 torso, 1 head, 2 tail
        kinds[train_counts >= max(head_min, rare_threshold + 1)] = 1
        kinds[(train_counts >= 1) & (train_counts <= rare_threshold)] = 2
        self.kinds = [torch.from_numpy(kinds[labels]) for labels in shards.player_labels]
        self.stacked_kinds = torch.cat(self.kinds)  # over the players' rows stacked
        self.sums = np.zeros(3)
        self.counts = np.zeros(3)

    def record(self, player: int, rows: torch.Tensor, norms: torch.Tensor) -> None:
        kinds = self.kinds[player][rows.cpu()]
        self.sums += np.bincount(kinds.numpy(), weights=norms.cpu().numpy(), minlength=3)
        self.counts += np.bincount(kinds.numpy(), minlength=3)

    def record_stacked(self, rows: torch.Tensor, norms: torch.Tensor) -> None:
        """As :meth:`record`, for rows of the players' tables stacked end to end."""
        kinds = self.stacked_kinds[rows.cpu()]
        self.sums += np.bincount(kinds.numpy(), weights=norms.cpu().numpy(), minlength=3)
        self.counts += np.bincount(kinds.numpy(), minlength=3)

    def summary(self, comm: Communicator | None = None) -> dict:
        """Means over the epoch; with ``comm``, over what every process recorded (label-parallel
        training, where each records its own players)."""
        if comm is not None and comm.active:
            totals = torch.from_numpy(np.concatenate([self.sums, self.counts])).to(comm.device)
            totals = comm.all_reduce_(totals).cpu().numpy()
            self.sums, self.counts = totals[:3], totals[3:]
        means = self.sums / np.maximum(self.counts, 1)
        return {"grad_norm_head": float(means[1]), "grad_norm_tail": float(means[2])}


def train_step(model, opt: Optimizers, inputs, pairs: Pairs, targets, rarity, game: GameConfig,
               probe: GradientProbe | None, share: BatchShare | None = None):
    """One batch of the game.

    With a ``probe`` (a measured batch), records the players' gradient norms and returns the
    batch's R, C_i and Phi (after the players moved); otherwise returns None (cyclic schedule).

    In data-parallel training ``share`` says which rows of the batch this process holds:
    ``inputs`` (a ``batch_inputs`` dict, or a list of (offset, size, dict) micro-batches) and
    ``targets`` are those rows', gradients are summed over processes before every step, and the
    results are the whole batch's (see :mod:`xmlgame.parallel`). Alone, it is the whole batch.
    """
    share = share or BatchShare(targets.shape[0])
    comm = share.comm
    players = model.players
    encoded = EncoderPass(model.encoder, inputs, share)
    h = encoded.h  # (B, D)
    n_entries = share.n_rows * targets.shape[1]  # the whole batch's B x C
    if game.schedule == "joint":
        result = payoffs(players.logits(h, pairs), targets, rarity, pairs, players, game,
                         n_entries)
        for o in opt.all():
            o.zero_grad(set_to_none=True)
        (-result.phi).backward()
        encoded.done()
        if comm.active:
            comm.sync_gradients_(*trainable_parameters(model))
        for i, table in enumerate(players.tables):
            if probe is not None and table.weight.grad is not None:
                probe.record(i, *row_gradient_norms(table))
        for o in opt.all():
            o.step()
        return share.sum_payoffs(result)

    # players: best responses on J_i, one after another, on the cached h(x)
    hd = h.detach()
    h1 = torch.cat([hd, hd.new_ones(hd.shape[0], 1)], 1)  # (B, D + 1): bias column
    with torch.no_grad():
        # the candidate rows of every player, gathered once and kept current through the steps
        weights = torch.cat([players.tables[i](pairs.player_rows[i])
                             for i in range(players.n_players)])  # (M, D + 1)
        logits = pair_major_logits(weights, hd)  # (M, B)
    state = BatchState.start(logits, targets, rarity, pairs, players, game, n_entries)
    player_steps(state, game, opt, pairs, weights, h1, probe, comm)
    with torch.no_grad():
        for i, own in enumerate(pairs.player_slices):  # the new rows into the tables
            if own.stop > own.start:
                players.tables[i].weight.index_copy_(0, pairs.player_rows[i], weights[own])

    # encoder and fusion: a step on Phi with every player's fresh logits
    with torch.no_grad():
        state.refresh(pair_major_logits(weights, hd))
    grad_logits = pair_logit_gradient(state, game, slice(None))  # (M, B)
    for o in [opt.fusion] + opt.encoder:
        o.zero_grad(set_to_none=True)
    encoded.backward(grad_logits.T @ weights[:, :-1])
    fusion_grad = comm.all_reduce_(fusion_logit_gradient(state))  # (M,)
    fusion_rows = torch.zeros(pairs.labels.numel(), 2, device=hd.device).index_put_(
        (pairs.col, pairs.pos), fusion_grad
    )
    set_row_gradient(players.fusion, pairs.labels, fusion_rows)
    if comm.active:
        comm.sync_gradients_(model.encoder.sparse_parameters(), model.encoder.dense_parameters())
    for o in [opt.fusion] + opt.encoder:
        o.step()
    if probe is None:
        return None
    return share.sum_payoffs(state.payoffs(game))


@torch.no_grad()
def player_steps(state: BatchState, game: GameConfig, opt: Optimizers, pairs: Pairs,
                 weights: torch.Tensor, h1: torch.Tensor, probe: GradientProbe | None,
                 comm: Communicator) -> None:
    """The players' steps of the cyclic schedule, player 0 first: each on the gradient of its
    J_i at the logits the players before it left. ``weights`` (M, D + 1), the pairs' rows, are
    updated in place (the tables are not).

    The order matters only where two players share a label: the later one's gradient on that
    label reads the earlier one's new probability. Every other gradient reads nothing that
    moves before it: a one-owner pair's depends on its own logit, and so does (with its
    peer's, which has not moved yet) that of a pair whose peer belongs to a later player. So
    one Adam step over every row equals a loop over the players, once the rows of the pairs
    shared with a later player are known beforehand: their new values are computed first
    (without touching the moments) and re-scored, and the pairs shared with an earlier player
    read those new probabilities. Adam is row-wise, so the rows computed twice come out the
    same both times.
    """
    moving = [i for i, own in enumerate(pairs.player_slices) if own.stop > own.start]
    opt.moments.advance(moving)
    first, second = state.shared.split()

    # a pair's gradient as if its label had one owner (the shared pairs' are replaced below)
    grad = one_owner_gradient(state, game, slice(None))  # (M, B)
    if first.index.numel():
        first_grad = shared_pair_gradient(state, game, first)
        first_rows = comm.all_reduce_(first_grad @ h1)  # data-parallel: the whole batch's
        new = opt.moments.update(pairs.stacked_rows[first.index], first_rows,
                                 weights[first.index], pairs.player[first.index], keep=False)
        state.rescore(first.index, new, h1[:, :-1])
        grad.index_copy_(0, second.index, shared_pair_gradient(state, game, second))
    grad_rows = comm.all_reduce_(grad @ h1)
    if first.index.numel():  # the look-ahead's rows: the very gradient it used
        grad_rows.index_copy_(0, first.index, first_rows)
    if probe is not None:
        probe.record_stacked(pairs.stacked_rows, grad_rows.norm(dim=1))
    weights.copy_(opt.moments.update(pairs.stacked_rows, grad_rows, weights, pairs.player))


def trainable_parameters(model) -> tuple[list, list]:
    """(sparse, dense) trainable parameters: embedding tables with sparse gradients, the rest."""
    sparse, dense = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                is_sparse = isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) \
                    and module.sparse
                (sparse if is_sparse else dense).append(param)
    return sparse, dense


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate_split(model, features, Y, train_counts, n_train, ab, config, k=None,
                   parallel: Parallel | None = None) -> tuple:
    """(predictions, metrics) of a split; with ``parallel``, shared over its processes and the
    same on each (see :meth:`Parallel.predict`)."""
    k = k or config.predict_k
    prediction = (model.predict_features(features, k=k) if parallel is None
                  else parallel.predict(model, features, k))
    topk = TopK(prediction.label_ids, prediction.scores)
    metrics = compute_metrics(
        topk, Y, train_counts, n_train, ab[0], ab[1], rare_threshold=config.rare_threshold,
    )
    return prediction, metrics


def selection_score(metrics: dict, select_metric: str) -> float:
    return float(sum(metrics[name] for name in select_metric.split("+")))


@torch.no_grad()
def tail_leaders(model: XmlModel, features, Y: sp.csr_matrix, train_counts, rare_threshold,
                 parallel: Parallel | None = None):
    """Per player: how many tail labels it is the top scorer for, on their positive documents.

    For each tail label (1..rare_threshold training documents) with positives in ``Y``, the
    owner with the highest mean probability on those positives leads it. With ``parallel``, each
    process sums over its documents (data-parallel) or its players (label-parallel) and the sums
    are added over processes.
    """
    model.eval()
    players = model.players
    sums = np.zeros((model.n_labels, 2))
    counts = np.zeros(model.n_labels)
    documents = np.arange(Y.shape[0]) if parallel is None \
        else parallel.evaluation_rows(Y.shape[0], 512)
    for start in range(0, len(documents), 512):
        rows = documents[start : start + 512]
        Yb = Y[rows]  # noqa: N806
        if Yb.nnz == 0:
            continue
        labels = np.unique(Yb.indices)
        pairs = players.pairs(torch.from_numpy(labels))
        held = players.pairs_of(pairs, players.held)  # all pairs but in label-parallel training
        h = model.encoder(batch_inputs(model.encoder, features, rows))
        probs = torch.sigmoid(players.logits(h, pairs, players.held))  # (B, M_held)
        positive = torch.from_numpy(Yb[:, labels].toarray()).to(h.device)[:, pairs.col[held]]
        pair_sums = (probs * positive).sum(0).cpu().numpy()
        np.add.at(sums, (labels[pairs.col[held].cpu().numpy()], pairs.pos[held].cpu().numpy()),
                  pair_sums)
        counts[labels] += np.asarray(Yb[:, labels].sum(0)).ravel()
    if parallel is not None and parallel.comm.active:
        comm = parallel.comm
        sums = comm.all_reduce_(torch.from_numpy(sums).to(comm.device)).cpu().numpy()
        if not parallel.label_parallel:  # each process counted its own documents
            counts = comm.all_reduce_(torch.from_numpy(counts).to(comm.device)).cpu().numpy()
    tail = (train_counts >= 1) & (train_counts <= rare_threshold) & (counts > 0)
    owners = model.shards.owner_player
    means = np.where(owners >= 0, sums, -np.inf)
    leader = owners[np.arange(len(owners)), means.argmax(1)]
    return np.bincount(leader[tail], minlength=players.n_players).tolist()


# --------------------------------------------------------------------------------------------
# the loop


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_states(device: torch.device) -> dict:
    """The torch random states a checkpoint keeps (the CPU's, and the GPU's on one)."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_random_states(saved: dict, device: torch.device) -> None:
    torch.set_rng_state(saved["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


class Trainer:
    """Runs the epochs of one run folder; ``run()`` returns the final test metrics."""

    def __init__(self, dataset: PreparedDataset, config: TrainConfig, run_dir: Path,
                 resume: bool = False, progress: bool = True):
        from accelerate import Accelerator

        self.comm = Communicator.current()
        check_launch(config, self.comm)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision=config.mixed_precision)
        self.parallel = Parallel(
            self.comm, config.players, config.label_parallel, config.grad_accum,
            self.accelerator.autocast if config.mixed_precision != "no" else nullcontext,
        )
        self.dataset = dataset
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.progress = progress and self.accelerator.is_main_process
        self.ab = dataset.propensity_ab

    def log(self, message: str, *args) -> None:
        if self.accelerator.is_main_process:
            logger.info(message, *args)

    def setup(self) -> None:
        config, dataset = self.config, self.dataset
        keep_batch_buffers()  # glibc: no page faults on every batch's buffers
        torch.manual_seed(config.seed)
        start = time.time()
        vocab = build_vocabulary(dataset, config.encoder)
        self.timings = {"vocabulary_seconds": round(time.time() - start, 2)}
        shards = make_shards(dataset.n_labels, config.players, config.overlap, config.seed)
        n_train = dataset.meta["counts"]["train_docs"]
        prior = label_prior(dataset.train_counts, n_train)
        full = dataset.n_labels <= config.full_candidates_max
        self.model = XmlModel(config.encoder, shards, vocab, prior, sparse_players=not full,
                              held_players=self.parallel.held_players).to(self.comm.device)
        start = time.time()
        with self.comm.main_first():  # a frozen transformer's embeddings are cached once
            self.data = featurize_dataset(self.model, dataset, config)
        self.timings["featurize_seconds"] = round(time.time() - start, 2)
        self.n_train = self.data.Y_train.shape[0]
        self.rarity = torch.from_numpy(1.0 / (1.0 + self.data.train_counts)).float()
        self.rarity = self.rarity.to(self.comm.device)
        self.candidates = Candidates(self.model.players, dataset.n_labels, config)
        self.game = config.game.for_candidates(self.candidates.full)
        # past full_candidates_max, a label index shortlists negatives and predictions
        self.mine_k = self.candidates.mine_k
        self.shortlisting = not self.candidates.full and (
            self.mine_k > 0 or config.predict_shortlist > 0
        )
        if self.shortlisting:
            self.model.shortlist_k = config.predict_shortlist
            self.model.shortlist_weight = config.shortlist_weight
            self.model.frequent_labels = frequent_labels(self.data.train_counts,
                                                         config.shortlist_frequent)
        self.opt = Optimizers(self.model, config)
        self.parallel.attach(self.model)
        if self.comm.is_main:
            self.model.save_static(self.run_dir, list(dataset.label_names))

    def header(self) -> None:
        c, d = self.config, self.data
        self.log(
            "run %s\n  data     %s: %d train / %d validation / %d test documents, %d labels\n"
            "  encoder  %s (D = %d)%s\n  game     N = %d players, overlap %.2f, alpha %.3g, "
            "beta %.3g, negatives weighted %.3g in curiosity, %s schedule\n"
            "  batches  %d x %d, candidates %s, %d epochs max",
            self.run_dir, self.dataset.name, self.n_train, d.Y_val.shape[0], d.Y_test.shape[0],
            self.dataset.n_labels, c.encoder.kind, self.model.encoder.dim,
            f", vocabulary {len(self.model.vocab):,}" if self.model.vocab is not None else "",
            c.players, c.overlap, c.game.alpha, c.game.beta, self.game.curiosity_negatives,
            c.game.schedule,
            -(-self.n_train // c.batch_size), c.batch_size,
            self.candidates.describe(),
            c.epochs,
        )
        self.log("  parallel %s", self.parallel.describe())

    def run_epoch(self, epoch: int) -> dict:
        config, model, data = self.config, self.model, self.data
        model.train()
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(self.n_train)
        probe = GradientProbe(model.shards, data.train_counts, config.rare_threshold)
        totals = {"phi": 0.0, "R": 0.0, "C": np.zeros(model.players.n_players), "n": 0}
        batches = range(0, self.n_train, config.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}", unit="batch", disable=not self.progress,
                   leave=False)
        start = time.time()
        for n_batches, first in enumerate(bar, start=1):
            rows = order[first : first + config.batch_size]
            pairs, targets = self.candidates.select(data.Y_train[rows], rng, rows)
            measure = (n_batches - 1) % config.measure_every == 0
            result = self.step(rows, pairs, targets, probe if measure else None)
            if result is not None:
                totals["phi"] += result.phi.item()
                totals["R"] += result.R.item()
                totals["C"] += result.C.detach().cpu().numpy()
                totals["n"] += 1
                bar.set_postfix(Phi=f"{totals['phi'] / totals['n']:.4f}", refresh=False)
        seconds = time.time() - start
        n = max(totals["n"], 1)
        return {
            "epoch": epoch + 1,
            "Phi": totals["phi"] / n,
            "R": totals["R"] / n,
            "C": (totals["C"] / n).tolist(),
            "measured_batches": totals["n"],
            **probe.summary(self.comm if self.parallel.label_parallel else None),
            "train_seconds": round(seconds, 2),
            "docs_per_second": round(self.n_train / seconds, 1),
        }

    def index_vectors(self) -> str:
        """What the label index holds, with ``auto`` resolved for this label count."""
        vectors = self.config.index_vectors
        if vectors == "auto":
            exact = self.config.index.resolved_kind(self.dataset.n_labels) == "flat"
            vectors = "both" if exact else "centroids"
        return vectors

    def refresh_shortlist(self, initial: bool = False, last: bool = False) -> dict:
        """Rebuild the label indexes from the current model and mine new hard negatives.

        In a launch of several processes, the main one does it and the others receive the result.
        Before the first epoch the players are untrained, so their head index would only rank
        labels by prior: the first negatives come from the centroid index alone when both are
        configured. After the last epoch nothing is left to mine for.
        """
        from xmlgame.mining import label_rows, refresh

        vectors = self.index_vectors()
        if initial and vectors == "both":
            vectors = "centroids"
        # label-parallel: each label's fused row takes every process's players
        rows = label_rows(self.model) if self.parallel.label_parallel else None

        def rebuild():
            return refresh(
                self.model, self.data.train, self.data.Y_train, self.config.index,
                0 if last else self.mine_k, label_names=self.dataset.label_names,
                vectors=vectors, progress=self.progress, rows=rows,
            )

        # one process builds (HNSW builds differ from run to run) and sends the indexes and the
        # negatives to the others, so that every process selects the same candidates
        done = self.comm.on_main(rebuild)
        self.model.shortlister = done.shortlister
        self.candidates.hard = done.hard_negatives
        entry = done.log_entry()
        self.log("shortlist refreshed: %s, %s", done.shortlister.kind, ", ".join(
            f"{stage} {s:.1f}s" for stage, s in done.seconds.items()
        ))
        return entry

    def step(self, rows: np.ndarray, pairs: Pairs, targets: torch.Tensor, probe):
        """This process's part of one batch's step (see :mod:`xmlgame.parallel`)."""
        model, game = self.model, self.game
        share = self.parallel.share(len(rows))
        local = rows[share.rows]
        inputs = [(offset, len(part), batch_inputs(model.encoder, self.data.train, part))
                  for offset, part in share.parts(local)]
        if len(inputs) == 1:
            inputs = inputs[0][2]  # one batch_inputs dict
        targets = targets.to(self.comm.device)
        rarity = self.rarity[pairs.labels]
        if self.parallel.label_parallel:
            return label_parallel_step(model, self.opt, inputs, pairs, targets, rarity, game,
                                       probe, share, self.parallel)
        return train_step(model, self.opt, inputs, pairs, targets[share.rows], rarity, game,
                          probe, share=share)

    def validate(self) -> dict:
        d = self.data
        _, metrics = evaluate_split(self.model, d.val, d.Y_val, d.train_counts, self.n_train,
                                    self.ab, self.config, parallel=self.parallel)
        leaders = tail_leaders(self.model, d.val, d.Y_val, d.train_counts,
                               self.config.rare_threshold, self.parallel)
        return {"val": {m: metrics[m] for m in VALIDATION_METRICS}, "tail_labels_led": leaders}

    # checkpoints

    def save_checkpoint(self, state: dict) -> None:
        # every process takes part in gathering; the main one writes the single-process layout
        weights = self.parallel.state_dict(self.model)
        optimizers = self.parallel.optimizer_states(self.opt, self.model)
        if not self.comm.is_main:
            return
        folder = self.run_dir / "checkpoint"
        tmp = self.run_dir / "checkpoint.tmp"
        tmp.mkdir(exist_ok=True)
        self.model.save_weights(tmp / "model.safetensors", weights)
        torch.save({"optimizers": optimizers, **random_states(self.comm.device)},
                   tmp / "optim.pt")
        if self.model.shortlister is not None:  # HNSW builds are not bit-reproducible
            self.model.shortlister.save(tmp)
        if self.candidates.hard is not None:
            np.save(tmp / "hard_negatives.npy", self.candidates.hard)
        (tmp / "state.json").write_text(json.dumps(state))
        if folder.exists():
            old = self.run_dir / "checkpoint.old"
            folder.replace(old)
            tmp.replace(folder)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            tmp.replace(folder)

    def load_checkpoint(self) -> dict:
        folder = self.run_dir / "checkpoint"
        if not (folder / "state.json").exists():
            raise XmlgameError(f"{self.run_dir} has no finished epoch to resume from")
        self.model.load_weights(folder / "model.safetensors")
        # label-parallel: map the file, so that only this process's players' states are read
        lean = self.parallel.label_parallel
        saved = torch.load(folder / "optim.pt", map_location="cpu", weights_only=False,
                           mmap=lean)
        self.parallel.load_optimizer_states(self.opt, self.model, saved["optimizers"], copy=lean)
        self.opt.restack()
        set_random_states(saved, self.comm.device)
        self.model.shortlister = Shortlister.load(folder)
        if (folder / "hard_negatives.npy").exists():
            self.candidates.hard = np.load(folder / "hard_negatives.npy")
        return json.loads((folder / "state.json").read_text())

    def save_best(self) -> None:
        """The selected weights and label indexes, written by the main process (the weights
        gathered from all)."""
        weights = self.parallel.state_dict(self.model)
        if self.comm.is_main:
            self.model.save_weights(self.run_dir / "model.safetensors", weights)
            self.model.save_shortlister(self.run_dir)

    def run(self) -> dict:
        config = self.config
        self.setup()
        self.header()
        state = {"epoch": 0, "best": -np.inf, "best_epoch": 0, "bad_epochs": 0}
        log_path = self.run_dir / "log.jsonl"
        if self.resume:
            state = self.load_checkpoint()
            if self.comm.is_main:
                kept = log_path.read_text().splitlines()[: state["epoch"]] \
                    if log_path.exists() else []
                log_path.write_text("".join(line + "\n" for line in kept))
            self.log("resuming after epoch %d", state["epoch"])
        initial = {}
        if self.shortlisting and not self.resume:
            initial = {"initial_" + k: v
                       for k, v in self.refresh_shortlist(initial=True).items()}
        for epoch in range(state["epoch"], config.epochs):
            if state["bad_epochs"] > config.patience:
                break
            entry = self.run_epoch(epoch)
            if self.shortlisting:
                entry.update(initial if epoch == 0 else {})
                entry.update(self.refresh_shortlist(last=epoch + 1 == config.epochs))
            entry.update(self.validate())
            entry["peak_rss_mb"] = round(peak_rss_mb(), 1)
            score = selection_score(entry["val"], config.select_metric)
            improved = score > state["best"]
            if improved:
                state.update(best=score, best_epoch=epoch + 1, bad_epochs=0)
                self.save_best()
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            if self.comm.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            self.save_checkpoint(state)
            v = entry["val"]
            self.log(
                "epoch %2d  Phi %.4f  R %.4f  val P@1 %.2f P@5 %.2f PSP@5 %.2f Rare-F1 %.2f  "
                "%.0fs%s", epoch + 1, entry["Phi"], entry["R"], 100 * v["p@1"], 100 * v["p@5"],
                100 * v["psp@5"], 100 * v["rare-f1@5"], entry["train_seconds"],
                "  *" if improved else "",
            )
        return self.finish(state)

    def finish(self, state: dict) -> dict:
        from xmlgame.predictions import save_predictions

        self.comm.barrier()  # the main process has written the selected weights
        self.model.load_weights(self.run_dir / "model.safetensors")
        if self.shortlisting:
            self.model.shortlister = Shortlister.load(self.run_dir)
        d = self.data
        start = time.time()
        prediction, metrics = evaluate_split(
            self.model, d.test, d.Y_test, self.dataset.train_counts,
            self.dataset.meta["counts"]["train_docs"], self.ab, self.config,
            parallel=self.parallel,
        )
        if not self.comm.is_main:
            return {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
                    "test": metrics}
        topk = TopK(prediction.label_ids, prediction.scores)
        save_predictions(self.run_dir / "predictions.npz", topk, dataset_name=self.dataset.name)
        results = {
            "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"],
            "test": metrics,
            "test_predict_seconds": round(time.time() - start, 2),
            **self.timings,
        }
        write_json(self.run_dir / "metrics.json", results)
        return results


def train(dataset: PreparedDataset, config: TrainConfig, run_dir: Path, resume: bool = False,
          progress: bool = True) -> dict:
    """Train (or resume) a run in ``run_dir``; returns the selected model's test results.

    Under a launcher, every process calls this with the same arguments (see
    :mod:`xmlgame.parallel`); the main process writes the run folder. Resuming keeps the saved
    configuration but takes the execution options (:data:`EXECUTION_OPTIONS`) from ``config``.
    """
    comm = Communicator.current()
    run_json = run_dir / "run.json"
    if resume:
        if not run_json.exists():
            raise XmlgameError(f"{run_dir} is not a run folder (no run.json); nothing to resume")
        saved = json.loads(run_json.read_text())
        changes = {name: getattr(config, name) for name in EXECUTION_OPTIONS}
        config = replace(TrainConfig(**saved["config"]), **changes)
        check_launch(config, comm)
        if comm.is_main:
            saved.update(config=asdict(config), processes=comm.world_size)
            write_json(run_json, saved)
    else:
        check_launch(config, comm)
        # the run records the game's settled weights, not "auto"
        every_label = dataset.n_labels <= config.full_candidates_max
        config = replace(config, game=config.game.for_candidates(every_label))
        info = {
            "dataset": {"name": dataset.name, "path": str(dataset.path.resolve()),
                        "input_checksum": dataset.meta["input_checksum"]},
            "config": asdict(config),
            "status": "training",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "processes": comm.world_size,
        }
        if comm.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_json, info)
        comm.barrier()  # the run folder exists for every process
    started = time.time()
    results = Trainer(dataset, config, run_dir, resume=resume, progress=progress).run()
    if comm.is_main:
        info = json.loads(run_json.read_text())
        info.update(status="done", wall_seconds=round(time.time() - started, 1),
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(run_json, info)
    return results
