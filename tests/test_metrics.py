"""Metrics: hand-checked cases, then every metric against a slow loop-based reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from xmlgame import metrics
from xmlgame.errors import XmlgameError
from xmlgame.metrics import (
    TopK,
    compute_metrics,
    compute_report,
    inverse_propensity,
    label_buckets,
    parse_metric_names,
    rank_rows,
)

# With N = e^2, A = 1, B = 1: C = (ln N - 1)(B + 1)^A = 2, so q_l = 1 + 2 / (n_l + 1).
E2, A1, B1 = math.e**2, 1.0, 1.0


def truth(rows: list[list[int]], n_labels: int) -> sp.csr_matrix:
    dense = np.zeros((len(rows), n_labels), dtype=np.float32)
    for i, labels in enumerate(rows):
        dense[i, labels] = 1.0
    return sp.csr_matrix(dense)


def topk(rows: list[list[int]], scores: list[list[float]] | None = None) -> TopK:
    """Rows of label ids, best first; default scores decrease along the row."""
    ids = np.array(rows, dtype=np.int64)
    if scores is None:
        scores = np.tile(np.arange(ids.shape[1], 0, -1, dtype=np.float32), (len(rows), 1))
    return TopK(ids, np.array(scores, dtype=np.float32))


def score(preds, rows, counts, names, n_train=E2, A=A1, B=B1, **kwargs):  # noqa: N803
    Y = truth(rows, len(counts))  # noqa: N806
    return compute_metrics(preds, Y, np.array(counts), n_train, A, B, names=names, **kwargs)


# --------------------------------------------------------------------------------------------
# propensities, names, ranking


def test_inverse_propensity_by_hand():
    # q = 1 + 2 / (n + 1): n = 0 -> 3 (unseen labels still get one), 1 -> 2, 3 -> 1.5
    q = inverse_propensity(np.array([0, 1, 3]), E2, A1, B1)
    np.testing.assert_allclose(q, [3.0, 2.0, 1.5])
    # the usual constants: N = 100, A = 0.55, B = 1.5, n = 10
    c = (math.log(100) - 1) * 2.5**0.55
    assert inverse_propensity(np.array([10]), 100, 0.55, 1.5)[0] == pytest.approx(
        1 + c * 11.5**-0.55
    )


def test_parse_metric_names():
    assert parse_metric_names(["P@1,psp@5", "PSP@5", " nDCG@3 "]) == ["p@1", "psp@5", "ndcg@3"]
    assert parse_metric_names(["p@5[TAIL]", "rare_f1@5"]) == ["p@5[tail]", "rare-f1@5"]
    assert parse_metric_names(None) == list(metrics.STANDARD)
    assert parse_metric_names(["standard"]) == list(metrics.STANDARD)


@pytest.mark.parametrize("bad", ["prec@5", "p@0", "p@", "ndcg@5[tail]", "p@5[middle]", ""])
def test_bad_metric_names_list_the_valid_ones(bad):
    with pytest.raises(XmlgameError) as error:
        parse_metric_names([bad])
    message = str(error.value)
    for valid in ("psp@K", "psndcg@K", "rare-f1@K", "tail", "d10", "standard"):
        assert valid in message


def test_ties_break_to_lower_label_id_and_padding_last():
    ids, scores = rank_rows(
        np.array([[5, 2, -1, 7]]), np.array([[0.7, 0.7, 9.0, 0.9]], dtype=np.float32)
    )
    assert ids.tolist() == [[7, 2, 5, -1]]
    # the same tie through the metrics: label 2 ranks first whatever the stored order
    preds = topk([[5, 2]], [[0.7, 0.7]])
    assert score(preds, [[2]], [1] * 6, ["p@1"])["p@1"] == 1.0
    assert score(preds, [[5]], [1] * 6, ["p@1"])["p@1"] == 0.0


# --------------------------------------------------------------------------------------------
# hand-checked values


def test_precision_ndcg_recall_with_an_empty_document():
    # doc 0: truth {0, 2}, ranking [2, 1, 0] -> hits 1, 0, 1
    # doc 1: truth {},     ranking [0, 1, 2] -> no hits (still counted in every mean)
    # doc 2: truth {4},    ranking [3, 4, -] -> hit at rank 2 (k = 3 > its 1 true label)
    preds = topk([[2, 1, 0], [0, 1, 2], [3, 4, -1]])
    rows = [[0, 2], [], [4]]
    got = score(preds, rows, [1] * 5, ["p@1", "p@3", "ndcg@1", "ndcg@3", "recall@1", "recall@3"])
    assert got["p@1"] == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3
    assert got["p@3"] == pytest.approx(1 / 3)  # (2/3 + 0 + 1/3) / 3
    assert got["ndcg@1"] == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3
    # doc 0: (1 + 1/log2 4) / (1 + 1/log2 3) = 1.5 / 1.63093 = 0.91972
    # doc 2: (1/log2 3) / 1 = 0.63093; doc 1: 0 -> mean 0.51688
    doc0 = 1.5 / (1 + 1 / math.log2(3))
    assert got["ndcg@3"] == pytest.approx((doc0 + 1 / math.log2(3)) / 3)
    assert got["ndcg@3"] == pytest.approx(0.51688, abs=1e-5)
    assert got["recall@1"] == pytest.approx((1 / 2) / 3)  # doc 0 finds 1 of 2
    assert got["recall@3"] == pytest.approx(2 / 3)  # docs 0 and 2 find all; doc 1 counts 0


def test_psp_is_a_ratio_of_sums_over_the_best_ranking():
    # counts [1, 3, 0, 0, 7] -> q = [2, 1.5, 3, 3, 1.25]
    counts = [1, 3, 0, 0, 7]
    # doc 0: truth {0, 1} (q 2, 1.5), ranking [1, 4, 0] -> hits q 1.5 (rank 1), 2 (rank 3)
    # doc 1: truth {4} (q 1.25),      ranking [4, 0, 1] -> hit q 1.25 (rank 1)
    preds = topk([[1, 4, 0], [4, 0, 1]])
    rows = [[0, 1], [4]]
    got = score(preds, rows, counts, ["psp@1", "psp@3", "psndcg@3", "p@3"])
    # psp@1: (1.5 + 1.25) / (best 2 + 1.25) = 2.75 / 3.25 = 0.84615 (a mean of ratios: 0.875)
    assert got["psp@1"] == pytest.approx(2.75 / 3.25)
    # psp@3: k exceeds the true labels; every true label is found -> 4.75 / 4.75
    assert got["psp@3"] == pytest.approx(1.0)
    # psndcg@3, per document divided by the unweighted IDCG:
    # doc 0: (1.5 + 2/log2 4) / (1 + 1/log2 3) = 2.5 / 1.63093; best (2 + 1.5/log2 3) / 1.63093
    # doc 1: 1.25 / 1 for both
    idcg0 = 1 + 1 / math.log2(3)
    num = 2.5 / idcg0 + 1.25
    den = (2 + 1.5 / math.log2(3)) / idcg0 + 1.25
    assert got["psndcg@3"] == pytest.approx(num / den)
    assert got["psndcg@3"] == pytest.approx(0.91046, abs=1e-5)


def test_psp_with_a_label_unseen_in_training():
    counts = [1, 3, 0, 0, 7]  # q = [2, 1.5, 3, 3, 1.25]; labels 2 and 3 never seen in training
    rows = [[0, 1], [4], [2]]
    # doc 2 carries the unseen label 2 (q 3) and misses it: the best ranking still counts it
    missed = score(topk([[1, 4, 0], [4, 0, 1], [0, 1, 4]]), rows, counts, ["psp@1", "psp@3"])
    assert missed["psp@1"] == pytest.approx(2.75 / 6.25)  # (1.5 + 1.25) / (2 + 1.25 + 3)
    assert missed["psp@3"] == pytest.approx(4.75 / 7.75)
    # found at rank 1 it earns its full weight
    found = score(topk([[1, 4, 0], [4, 0, 1], [2, 1, 4]]), rows, counts, ["psp@1"])
    assert found["psp@1"] == pytest.approx(5.75 / 6.25)
    report = compute_report(
        topk([[1, 4, 0], [4, 0, 1], [2, 1, 4]]), truth(rows, 5), np.array(counts), E2, A1, B1,
        names=["psp@1"],
    )
    assert report.counts["unseen_label_assignments"] == 1


def test_rare_f1_counts():
    # tau = 10: labels 0 (n=1), 1 (n=10), 4 (n=5) are rare; 2 (n=11) is not; 3 (n=0) is unseen
    counts = [1, 10, 11, 0, 5]
    rows = [[0, 2, 3], [1, 4], []]
    preds = topk([[0, 1], [2, 1], [4, 3]], [[0.9, 0.2], [0.8, 0.6], [0.3, 0.1]])
    # doc 0: 0 TP, 1 FP; doc 1: 1 TP (2 is not rare), 4 FN; doc 2: 4 FP (3 is unseen, ignored)
    # TP 2, FP 2, FN 1 -> F1 = 4 / (4 + 2 + 1)
    report = compute_report(preds, truth(rows, 5), np.array(counts), E2, A1, B1, ["rare-f1@2"])
    assert report.counts["rare-f1@2"] == {"tp": 2, "fp": 2, "fn": 1}
    assert report.metrics["rare-f1@2"] == pytest.approx(4 / 7)
    assert report.counts["unseen_label_assignments"] == 1
    assert report.counts["rare_labels"] == 3 and report.counts["rare_assignments"] == 3
    # a score threshold of 0.5 drops the FP of doc 0 (0.2) and of doc 2 (0.3): F1 = 4 / 5
    got = score(preds, rows, counts, ["rare-f1@2"], score_threshold=0.5)
    assert got["rare-f1@2"] == pytest.approx(4 / 5)
    # tau = 5: label 1 is no longer rare; TP 1 (label 0), FP 1 (label 4), FN 1 (label 4)
    got = score(preds, rows, counts, ["rare-f1@2"], rare_threshold=5)
    assert got["rare-f1@2"] == pytest.approx(2 / 4)


def test_coverage():
    # labels present in the truth: 0, 2, 4
    preds = topk([[2, 1, 0], [0, 1, 2], [3, 4, -1]])
    got = score(preds, [[0, 2], [], [4]], [1] * 5, ["coverage@1", "coverage@3"])
    assert got["coverage@1"] == pytest.approx(1 / 3)  # only label 2 is found at rank 1
    assert got["coverage@3"] == pytest.approx(1.0)


def test_label_buckets():
    # counts 6, 3, 2, 1, 0 (total 12); assignments of more frequent labels: 0, 6, 9, 11, 12
    counts = np.array([6, 3, 2, 1, 0])
    assert label_buckets(counts, 3).tolist() == [0, 1, 2, 2, 2]  # floor(3 * S / 12), max 2
    assert label_buckets(counts, 10).tolist() == [0, 5, 7, 9, 9]  # floor(10 * S / 12), max 9
    # equal counts share a bucket
    assert label_buckets(np.array([2, 2, 2, 2]), 3).tolist() == [0, 0, 0, 0]
    assert label_buckets(np.array([0, 0]), 3).tolist() == [2, 2]


def test_buckets_add_up_to_the_overall_value():
    counts = [6, 3, 2, 1, 0]  # head {0}, torso {1}, tail {2, 3, 4}
    # doc 0: truth {0, 2}, ranking [0, 1, 2] -> hits label 0 (head), 2 (tail)
    # doc 1: truth {3},    ranking [4, 3, 1] -> hit label 3 (tail)
    preds = topk([[0, 1, 2], [4, 3, 1]])
    rows = [[0, 2], [3]]
    names = [f"{m}@3{b}" for m in ("p", "psp") for b in ("", "[head]", "[torso]", "[tail]")]
    got = score(preds, rows, counts, names)
    assert got["p@3"] == pytest.approx(3 / 6)
    assert got["p@3[head]"] == pytest.approx(1 / 6)
    assert got["p@3[torso]"] == 0.0
    assert got["p@3[tail]"] == pytest.approx(2 / 6)
    q = 1 + 2 / (np.array(counts) + 1)
    best = q[0] + q[2] + q[3]  # every true label fits in the top 3
    assert got["psp@3"] == pytest.approx(1.0)
    assert got["psp@3[head]"] == pytest.approx(q[0] / best)
    assert got["psp@3[tail]"] == pytest.approx((q[2] + q[3]) / best)
    deciles = score(preds, rows, counts, [f"p@3[d{i}]" for i in range(1, 11)])
    assert sum(deciles.values()) == pytest.approx(got["p@3"])


def test_no_labels_at_all_gives_zero_not_nan():
    got = score(topk([[0, 1]]), [[]], [1, 1], ["p@1", "ndcg@2", "psp@2", "psndcg@2", "coverage@2"])
    assert all(value == 0.0 for value in got.values())


def test_input_errors():
    with pytest.raises(XmlgameError, match="too few for p@5"):
        score(topk([[0, 1]]), [[0]], [1, 1], ["p@5"])
    with pytest.raises(XmlgameError, match="outside"):
        score(topk([[0, 9]]), [[0]], [1, 1], ["p@1"])
    with pytest.raises(XmlgameError, match="twice"):
        score(topk([[1, 1]]), [[0]], [1, 1], ["p@1"])
    with pytest.raises(XmlgameError, match="documents"):
        score(topk([[0, 1]]), [[0], [1]], [1, 1], ["p@1"])


# --------------------------------------------------------------------------------------------
# every metric against a slow reference


def reference(ids, scores, rows, counts, n_train, A, B, name, tau, threshold):  # noqa: N803
    """One metric, computed document by document in plain Python from its definition."""
    spec = metrics.parse_metric(name)
    k, n = spec.k, len(rows)
    c = (math.log(n_train) - 1) * (B + 1) ** A
    q = [1 + c * (count + B) ** -A for count in counts]
    total = sum(counts)
    bucket_of = {}
    if spec.bucket:
        n_buckets, index = metrics.BUCKETS[spec.bucket]
        for label, count in enumerate(counts):
            more = sum(other for other in counts if other > count)
            bucket_of[label] = min(n_buckets - 1, (n_buckets * more) // total) == index

    def ranking(i):
        order = sorted(range(len(ids[i])), key=lambda j: (ids[i][j] < 0, -scores[i][j], ids[i][j]))
        return [(ids[i][j], scores[i][j]) for j in order][:k]

    def idcg(m):
        return sum(1 / math.log2(j + 2) for j in range(m if m > 0 else k))

    num = den = 0.0
    tp = fp = fn = 0
    covered = set()
    for i in range(n):
        true = set(rows[i])
        ranked = ranking(i)
        best = sorted((q[label] for label in true), reverse=True)[:k]
        m = min(k, len(true))
        for j, (label, value) in enumerate(ranked):
            hit = label >= 0 and label in true
            keep = not spec.bucket or (label >= 0 and bucket_of[label])
            if spec.family == "p":
                num += hit and keep
            elif spec.family == "psp":
                num += q[label] if hit and keep else 0.0
            elif spec.family == "ndcg":
                num += hit / math.log2(j + 2) / idcg(m)
            elif spec.family == "psndcg":
                num += (q[label] if hit else 0.0) / math.log2(j + 2) / idcg(m)
            elif spec.family == "recall":
                num += hit / max(len(true), 1)
            elif spec.family == "coverage" and hit:
                covered.add(label)
            elif spec.family == "rare-f1" and label >= 0 and 1 <= counts[label] <= tau:
                if threshold is None or value >= threshold:
                    tp += hit
                    fp += not hit
        fn += sum(1 for label in true if 1 <= counts[label] <= tau)
        if spec.family == "p":
            den += k
        elif spec.family in ("ndcg", "recall"):
            den += 1
        elif spec.family == "psp":
            den += sum(best)
        elif spec.family == "psndcg":
            den += sum(w / math.log2(j + 2) for j, w in enumerate(best)) / idcg(m)
    if spec.family == "coverage":
        num, den = len(covered), len({label for row in rows for label in row})
    if spec.family == "rare-f1":
        fn -= tp
        num, den = 2 * tp, 2 * tp + fp + fn
    return num / den if den else 0.0


def random_world(seed, n=70, n_labels=40, width=8):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 15, size=n_labels) * (rng.random(n_labels) < 0.8)
    rows = []
    for _ in range(n):
        size = rng.integers(0, 6)  # some documents have no labels
        rows.append(sorted(rng.choice(n_labels, size=size, replace=False).tolist()))
    ids = np.stack([rng.permutation(n_labels)[:width] for _ in range(n)]).astype(np.int64)
    # plant some hits, padding and ties (scores on a coarse grid)
    for i in range(n):
        missing = [label for label in rows[i] if label not in ids[i]]
        if missing and rng.random() < 0.6:
            ids[i, rng.integers(width)] = missing[0]
        if rng.random() < 0.2:
            ids[i, width - rng.integers(1, 3):] = -1
    scores = (rng.integers(0, 5, size=(n, width)) / 4).astype(np.float32)
    return counts, rows, ids, scores


ALL_NAMES = (
    [f"{f}@{k}" for f in metrics.FAMILIES for k in (1, 3, 5, 8)]
    + [f"{f}@{k}[{b}]" for f in ("p", "psp") for k in (3, 5) for b in metrics.BUCKETS]
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_every_metric_matches_the_slow_reference(seed, threshold, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_ENTRIES", 64)  # several chunks of 8 documents
    counts, rows, ids, scores = random_world(seed)
    n_train, A, B, tau = 500, 0.55, 1.5, 6  # noqa: N806
    got = compute_metrics(
        TopK(ids, scores), truth(rows, len(counts)), counts, n_train, A, B, names=ALL_NAMES,
        rare_threshold=tau, score_threshold=threshold,
    )
    assert list(got) == ALL_NAMES
    ids_list, scores_list = ids.tolist(), scores.tolist()
    for name in ALL_NAMES:
        expected = reference(
            ids_list, scores_list, rows, counts.tolist(), n_train, A, B, name, tau, threshold
        )
        assert got[name] == pytest.approx(expected, rel=1e-9, abs=1e-12), name


def test_ndcg_matches_pyxclib_array_formulas():
    """nDCG and PS metrics as pyxclib's dense array arithmetic has them (re-derived, not copied):
    a per-document normaliser ``min(cumdisc[n_i - 1], cumdisc[k - 1])``, where ``n_i = 0`` wraps
    to the table's last entry, and PS metrics as a ratio of two means over all documents."""
    counts, rows, ids, scores = random_world(7, width=5)
    k, n_train, A, B = 5, 500, 0.55, 1.5  # noqa: N806
    Y = truth(rows, len(counts)).toarray()  # noqa: N806
    ranked, _ = rank_rows(ids, scores)
    q = inverse_propensity(counts, n_train, A, B)
    flags = np.where(ranked >= 0, Y[np.arange(len(rows))[:, None], ranked], 0.0)
    weighted = flags * np.where(ranked >= 0, q[ranked], 0.0)
    ideal = -np.sort(-(Y * q), axis=1)[:, :k]  # best ranking: true labels by q descending
    n_true = Y.sum(axis=1).astype(int)
    table = np.cumsum(1 / np.log2(np.arange(1, max(n_true.max(), k) + 1) + 1))
    norm = np.minimum(table[n_true - 1], table[k - 1])
    disc = 1 / np.log2(np.arange(k) + 2)
    got = compute_metrics(
        TopK(ids, scores), sp.csr_matrix(Y), counts, n_train, A, B,
        names=["ndcg@5", "psp@5", "psndcg@5"],
    )
    assert got["ndcg@5"] == pytest.approx(np.mean(flags @ disc / norm))
    assert got["psp@5"] == pytest.approx(np.mean(weighted.sum(1)) / np.mean(ideal.sum(1)))
    assert got["psndcg@5"] == pytest.approx(
        np.mean(weighted @ disc / norm) / np.mean(ideal @ disc / norm)
    )
