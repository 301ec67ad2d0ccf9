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
predictions); then the encoder and the fusion weights take a step on ``Phi`` with all players'
fresh logits. The ``joint`` schedule takes one step on ``Phi`` for everything.

A validation split carved from the training data (seeded) selects the best epoch and stops
training early; the test split is touched once, at the end.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from xmlgame.dataset import PreparedDataset
from xmlgame.encoders import EncoderConfig, SplitFeatures, TfidfVocabulary, batch_inputs
from xmlgame.errors import XmlgameError
from xmlgame.game import (
    BatchState,
    GameConfig,
    fusion_logit_gradient,
    pair_logit_gradient,
    payoffs,
)
from xmlgame.metrics import TopK, compute_metrics
from xmlgame.mining import VECTORS, Shortlister
from xmlgame.model import XmlModel, dataset_fingerprint, label_prior
from xmlgame.optim import RowAdam
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
    index_vectors: str = "both"  # label centroids, the players' heads, or both (see mining)
    index: IndexConfig = field(default_factory=IndexConfig)
    val_fraction: float = 0.05
    val_max: int = 5_000
    patience: int = 2
    select_metric: str = "psp@5+p@1"
    rare_threshold: int = 10
    predict_k: int = 20
    measure_every: int = 4  # batches between measurements of Phi, R, C_i and gradient norms
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        if isinstance(self.game, dict):
            self.game = GameConfig(**self.game)
        if isinstance(self.index, dict):
            self.index = IndexConfig(**self.index)
        if self.shortlist_k < 0 or self.predict_shortlist < 0 or self.negatives < 0:
            raise XmlgameError(
                "--shortlist-k, --predict-shortlist and --negatives must be >= 0, got "
                f"{self.shortlist_k}, {self.predict_shortlist} and {self.negatives}"
            )
        if self.index_vectors not in VECTORS:
            raise XmlgameError(
                f"--index-vectors {self.index_vectors!r}: choose one of {', '.join(VECTORS)}"
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
        for name in self.select_metric.split("+"):
            if name not in VALIDATION_METRICS:
                raise XmlgameError(
                    f"--select-metric part {name!r} is not one of {', '.join(VALIDATION_METRICS)}"
                )


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


def set_row_gradient(table: torch.nn.Embedding, rows: torch.Tensor, grad_rows: torch.Tensor):
    """Give a table the gradient ``grad_rows`` on ``rows`` (sparse or dense, as it expects)."""
    if table.sparse:
        table.weight.grad = torch.sparse_coo_tensor(
            rows[None], grad_rows, table.weight.shape, check_invariants=False
        )
    else:
        grad = torch.zeros_like(table.weight)
        grad[rows] = grad_rows  # rows are distinct: one pair per (label, player)
        table.weight.grad = grad


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
        self.sums = np.zeros(3)
        self.counts = np.zeros(3)

    def record(self, player: int, rows: torch.Tensor, norms: torch.Tensor) -> None:
        kinds = self.kinds[player][rows]
        self.sums += np.bincount(kinds.numpy(), weights=norms.numpy(), minlength=3)
        self.counts += np.bincount(kinds.numpy(), minlength=3)

    def summary(self) -> dict:
        means = self.sums / np.maximum(self.counts, 1)
        return {"grad_norm_head": float(means[1]), "grad_norm_tail": float(means[2])}


def train_step(model, opt: Optimizers, inputs, pairs: Pairs, targets, rarity, game: GameConfig,
               probe: GradientProbe | None):
    """One batch of the game.

    With a ``probe`` (a measured batch), records the players' gradient norms and returns the
    batch's R, C_i and Phi (after the players moved); otherwise returns None (cyclic schedule).
    """
    players = model.players
    h = model.encoder(inputs)  # (B, D)
    if game.schedule == "joint":
        result = payoffs(players.logits(h, pairs), targets, rarity, pairs, players, game)
        for o in opt.all():
            o.zero_grad(set_to_none=True)
        (-result.phi).backward()
        for i, table in enumerate(players.tables):
            if probe is not None and table.weight.grad is not None:
                probe.record(i, *row_gradient_norms(table))
        for o in opt.all():
            o.step()
        return result

    # players: best responses on J_i, one after another, on the cached h(x)
    hd = h.detach()
    h1 = torch.cat([hd, hd.new_ones(hd.shape[0], 1)], 1)  # (B, D + 1): bias column
    with torch.no_grad():
        # each player's candidate rows, gathered once and kept current through its step
        weights = [players.tables[i](pairs.player_rows[i]) for i in range(players.n_players)]
        logits = torch.cat([hd @ w[:, :-1].T + w[:, -1] for w in weights], 1)  # (B, M)
    state = BatchState.start(logits, targets, rarity, pairs, players)
    for i in range(players.n_players):
        own = pairs.player_slices[i]
        if opt.players[i] is None or own.stop == own.start:
            continue
        grad_rows = pair_logit_gradient(state, game, own).T @ h1  # (M_i, D + 1)
        rows = pairs.player_rows[i]
        if probe is not None:
            probe.record(i, rows, grad_rows.norm(dim=1))
        table = players.tables[i]
        if table.sparse:  # update the candidates' rows in place, no sparse tensor needed
            weights[i] = opt.players[i].step_rows(table.weight, rows, grad_rows)
        else:
            set_row_gradient(table, rows, grad_rows)
            opt.players[i].step()
            weights[i] = table.weight.detach()[rows]
        with torch.no_grad():
            state.replace(i, hd @ weights[i][:, :-1].T + weights[i][:, -1])

    # encoder and fusion: a step on Phi with every player's fresh logits
    slope_fused = state.fused_slope(slice(None))  # dR/dp at every pair's label, (B, M)
    grad_logits = pair_logit_gradient(state, game, slice(None), slope_fused)  # (B, M)
    weights = torch.cat(weights)  # (M, D + 1), after the players' steps
    for o in [opt.fusion] + opt.encoder:
        o.zero_grad(set_to_none=True)
    h.backward(grad_logits @ weights[:, :-1])
    fusion_rows = torch.zeros(pairs.labels.numel(), 2).index_put_(
        (pairs.col, pairs.pos), fusion_logit_gradient(state, slope_fused)
    )
    set_row_gradient(players.fusion, pairs.labels, fusion_rows)
    for o in [opt.fusion] + opt.encoder:
        o.step()
    if probe is None:
        return None
    with torch.no_grad():
        return payoffs(state.logits, targets, rarity, pairs, players, game)


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate_split(model, features, Y, train_counts, n_train, ab, config, k=None) -> tuple:
    prediction = model.predict_features(features, k=k or config.predict_k)
    topk = TopK(prediction.label_ids, prediction.scores)
    metrics = compute_metrics(
        topk, Y, train_counts, n_train, ab[0], ab[1], rare_threshold=config.rare_threshold,
    )
    return prediction, metrics


def selection_score(metrics: dict, select_metric: str) -> float:
    return float(sum(metrics[name] for name in select_metric.split("+")))


@torch.no_grad()
def tail_leaders(model: XmlModel, features, Y: sp.csr_matrix, train_counts, rare_threshold):
    """Per player: how many tail labels it is the top scorer for, on their positive documents.

    For each tail label (1..rare_threshold training documents) with positives in ``Y``, the
    owner with the highest mean probability on those positives leads it.
    """
    model.eval()
    players = model.players
    sums = np.zeros((model.n_labels, 2))
    counts = np.zeros(model.n_labels)
    for start in range(0, Y.shape[0], 512):
        rows = np.arange(start, min(start + 512, Y.shape[0]))
        Yb = Y[rows]  # noqa: N806
        if Yb.nnz == 0:
            continue
        labels = np.unique(Yb.indices)
        pairs = players.pairs(torch.from_numpy(labels))
        probs = torch.sigmoid(players.logits(model.encoder(batch_inputs(model.encoder, features,
                                                                         rows)), pairs))
        positive = torch.from_numpy(Yb[:, labels].toarray())[:, pairs.col]  # (B, M)
        pair_sums = (probs * positive).sum(0).numpy()
        np.add.at(sums, (labels[pairs.col.numpy()], pairs.pos.numpy()), pair_sums)
        counts[labels] += np.asarray(Yb[:, labels].sum(0)).ravel()
    tail = (train_counts >= 1) & (train_counts <= rare_threshold) & (counts > 0)
    owners = model.shards.owner_player
    means = np.where(owners >= 0, sums, -np.inf)
    leader = owners[np.arange(len(owners)), means.argmax(1)]
    return np.bincount(leader[tail], minlength=players.n_players).tolist()


# --------------------------------------------------------------------------------------------
# the loop


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """Runs the epochs of one run folder; ``run()`` returns the final test metrics."""

    def __init__(self, dataset: PreparedDataset, config: TrainConfig, run_dir: Path,
                 resume: bool = False, progress: bool = True):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
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
        torch.manual_seed(config.seed)
        start = time.time()
        vocab = build_vocabulary(dataset, config.encoder)
        self.timings = {"vocabulary_seconds": round(time.time() - start, 2)}
        shards = make_shards(dataset.n_labels, config.players, config.overlap, config.seed)
        n_train = dataset.meta["counts"]["train_docs"]
        prior = label_prior(dataset.train_counts, n_train)
        full = dataset.n_labels <= config.full_candidates_max
        self.model = XmlModel(config.encoder, shards, vocab, prior, sparse_players=not full)
        start = time.time()
        self.data = featurize_dataset(self.model, dataset, config)
        self.timings["featurize_seconds"] = round(time.time() - start, 2)
        self.n_train = self.data.Y_train.shape[0]
        self.rarity = torch.from_numpy(1.0 / (1.0 + self.data.train_counts)).float()
        self.candidates = Candidates(self.model.players, dataset.n_labels, config)
        # past full_candidates_max, a label index shortlists negatives and predictions
        self.mine_k = self.candidates.mine_k
        self.shortlisting = not self.candidates.full and (
            self.mine_k > 0 or config.predict_shortlist > 0
        )
        if self.shortlisting:
            self.model.shortlist_k = config.predict_shortlist
            self.model.shortlist_weight = config.shortlist_weight
        self.opt = Optimizers(self.model, config)
        self.model.save_static(self.run_dir, list(dataset.label_names))

    def header(self) -> None:
        c, d = self.config, self.data
        self.log(
            "run %s\n  data     %s: %d train / %d validation / %d test documents, %d labels\n"
            "  encoder  %s (D = %d)%s\n  game     N = %d players, overlap %.2f, alpha %.3g, "
            "beta %.3g, %s schedule\n  batches  %d x %d, candidates %s, %d epochs max",
            self.run_dir, self.dataset.name, self.n_train, d.Y_val.shape[0], d.Y_test.shape[0],
            self.dataset.n_labels, c.encoder.kind, self.model.encoder.dim,
            f", vocabulary {len(self.model.vocab):,}" if self.model.vocab is not None else "",
            c.players, c.overlap, c.game.alpha, c.game.beta, c.game.schedule,
            -(-self.n_train // c.batch_size), c.batch_size,
            self.candidates.describe(),
            c.epochs,
        )

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
            inputs = batch_inputs(model.encoder, data.train, rows)
            measure = (n_batches - 1) % config.measure_every == 0
            result = train_step(model, self.opt, inputs, pairs, targets,
                                self.rarity[pairs.labels], config.game, probe if measure else None)
            if result is not None:
                totals["phi"] += result.phi.item()
                totals["R"] += result.R.item()
                totals["C"] += result.C.detach().numpy()
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
            **probe.summary(),
            "train_seconds": round(seconds, 2),
            "docs_per_second": round(self.n_train / seconds, 1),
        }

    def refresh_shortlist(self, initial: bool = False, last: bool = False) -> dict:
        """Rebuild the label indexes from the current model and mine new hard negatives.

        Before the first epoch the players are untrained, so their head index would only rank
        labels by prior: the first negatives come from the centroid index alone when both are
        configured. After the last epoch nothing is left to mine for.
        """
        from xmlgame.mining import refresh

        vectors = self.config.index_vectors
        done = refresh(
            self.model, self.data.train, self.data.Y_train, self.config.index,
            0 if last else self.mine_k, label_names=self.dataset.label_names,
            vectors="centroids" if initial and vectors == "both" else vectors,
            progress=self.progress,
        )
        self.model.shortlister = done.shortlister
        self.candidates.hard = done.hard_negatives
        entry = done.log_entry()
        self.log("shortlist refreshed: %s, %s", done.shortlister.kind, ", ".join(
            f"{stage} {s:.1f}s" for stage, s in done.seconds.items()
        ))
        return entry

    def validate(self) -> dict:
        d = self.data
        _, metrics = evaluate_split(self.model, d.val, d.Y_val, d.train_counts, self.n_train,
                                    self.ab, self.config)
        leaders = tail_leaders(self.model, d.val, d.Y_val, d.train_counts,
                               self.config.rare_threshold)
        return {"val": {m: metrics[m] for m in VALIDATION_METRICS}, "tail_labels_led": leaders}

    # checkpoints

    def save_checkpoint(self, state: dict) -> None:
        folder = self.run_dir / "checkpoint"
        tmp = self.run_dir / "checkpoint.tmp"
        tmp.mkdir(exist_ok=True)
        self.model.save_weights(tmp / "model.safetensors")
        torch.save({"optimizers": self.opt.state_dict(), "torch_rng": torch.get_rng_state()},
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
        saved = torch.load(folder / "optim.pt", weights_only=False)
        self.opt.load_state_dict(saved["optimizers"])
        torch.set_rng_state(saved["torch_rng"])
        self.model.shortlister = Shortlister.load(folder)
        if (folder / "hard_negatives.npy").exists():
            self.candidates.hard = np.load(folder / "hard_negatives.npy")
        return json.loads((folder / "state.json").read_text())

    def run(self) -> dict:
        config = self.config
        self.setup()
        self.header()
        state = {"epoch": 0, "best": -np.inf, "best_epoch": 0, "bad_epochs": 0}
        log_path = self.run_dir / "log.jsonl"
        if self.resume:
            state = self.load_checkpoint()
            kept = log_path.read_text().splitlines()[: state["epoch"]] if log_path.exists() else []
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
                self.model.save_weights(self.run_dir / "model.safetensors")
                self.model.save_shortlister(self.run_dir)
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
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

        self.model.load_weights(self.run_dir / "model.safetensors")
        if self.shortlisting:
            self.model.shortlister = Shortlister.load(self.run_dir)
        d = self.data
        start = time.time()
        prediction, metrics = evaluate_split(
            self.model, d.test, d.Y_test, self.dataset.train_counts,
            self.dataset.meta["counts"]["train_docs"], self.ab, self.config,
        )
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
    """Train (or resume) a run in ``run_dir``; returns the selected model's test results."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_json = run_dir / "run.json"
    if resume:
        if not run_json.exists():
            raise XmlgameError(f"{run_dir} is not a run folder (no run.json); nothing to resume")
        saved = json.loads(run_json.read_text())
        config = TrainConfig(**saved["config"])
    else:
        info = {
            "dataset": {"name": dataset.name, "path": str(dataset.path.resolve()),
                        "input_checksum": dataset.meta["input_checksum"]},
            "config": asdict(config),
            "status": "training",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(run_json, info)
    started = time.time()
    results = Trainer(dataset, config, run_dir, resume=resume, progress=progress).run()
    info = json.loads(run_json.read_text())
    info.update(status="done", wall_seconds=round(time.time() - started, 1),
                finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(run_json, info)
    return results
