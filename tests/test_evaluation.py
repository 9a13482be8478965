"""The class-conditional metric panel (evaluation.py), each metric against a hand computation on small
feature sets, and the behaviour each must show: KID near 0 for a set against itself and larger for a
shifted one, intra-FD larger for shuffled labels, precision 1 and recall below 1 for a subset."""
import numpy as np
import pytest
import torch

import evaluation


def test_feature_distance_hand_checked():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert abs(evaluation.feature_distance(a, a)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert evaluation.feature_distance(a + shift, a) == pytest.approx(shift @ shift, rel=1e-6)  # |d|^2
    k = 2.0  # b = k a: |(1 - k) mu|^2 + (1 - k)^2 tr(Sigma)
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert evaluation.feature_distance(k * a, a) == pytest.approx((1 - k) ** 2 * (mu @ mu + np.trace(sigma)), rel=1e-6)


def unbiased_mmd2(x, y):
    """By hand: the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, over all pairs."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_is_the_unbiased_polynomial_mmd_and_reproducible():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 4)), rng.normal(0.5, 1.0, size=(12, 4))
    # one subset holding every feature: exactly the unbiased MMD^2 of the two sets
    assert evaluation.kid(a, b, num_subsets=1, max_subset_size=12) == pytest.approx(unbiased_mmd2(a, b), rel=1e-9)
    big = rng.normal(size=(600, 8))
    same = evaluation.kid(big[:300], big[300:], max_subset_size=200)
    shifted = evaluation.kid(big[:300], big[300:] + 1.0, max_subset_size=200)
    assert abs(same) < 0.01 < shifted  # unbiased: about 0 for one distribution, whatever the subsets
    state = np.random.get_state()
    assert evaluation.kid(big[:300], big[300:], max_subset_size=200) == same  # seeded: reproducible
    assert np.array_equal(np.random.get_state()[1], state[1])  # and numpy's global generator is left alone


def test_intra_fd_is_the_mean_of_per_class_distances_and_sees_wrong_labels():
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 4, size=(3, 4))
    ref_labels, labels = np.repeat(np.arange(3), 200), np.repeat(np.arange(3), 150)
    ref = centres[ref_labels] + rng.normal(size=(600, 4))
    fake = centres[labels] + rng.normal(size=(450, 4))
    mean, per_class = evaluation.intra_fd(fake, labels, ref, ref_labels, num_classes=3)
    assert per_class == [evaluation.feature_distance(fake[labels == c], ref[ref_labels == c]) for c in range(3)]
    assert mean == pytest.approx(np.mean(per_class)) and max(per_class) < 1.0
    shuffled, _ = evaluation.intra_fd(fake, rng.permutation(labels), ref, ref_labels, num_classes=3)
    assert shuffled > 10 * mean  # the same samples under the wrong labels: far from each class


def test_precision_and_recall_by_hand_and_for_a_subset():
    # on a line: real at 0, 1, 2, 10 (k = 1: radii 1, 1, 1, 8); fake at 0.5 (inside), 5 (inside 10's ball), 30
    real, fake = np.array([[0.0], [1.0], [2.0], [10.0]]), np.array([[0.5], [5.0], [30.0]])
    # fake radii (k = 1): 4.5, 4.5, 25; real inside a fake ball: 0, 1, 2 (0.5's), 10 (5's or 30's): all
    assert evaluation.precision_recall(real, fake, k=1) == (pytest.approx(2 / 3), pytest.approx(1.0))
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(500, 6))
    precision, recall = evaluation.precision_recall(ref, ref[:100], k=3, chunk=64)  # chunks: the same answer
    assert precision == 1.0 and recall < 1.0
    assert (precision, recall) == evaluation.precision_recall(ref, ref[:100], k=3, chunk=1000)
    assert evaluation.precision_recall(ref, ref) == (1.0, 1.0)  # the whole reference: both manifolds coincide
    made_once = evaluation.manifold(ref, k=3)  # a fixed reference's manifold, made beforehand: the same answer
    assert evaluation.precision_recall(ref, ref[:100], k=3, real_manifold=made_once) == (precision, recall)


def test_the_panel_holds_every_metric_and_the_per_class_numbers():
    rng = np.random.default_rng(4)
    labels, ref_labels = np.arange(300) % 3, np.arange(240) % 3
    feats, ref = rng.normal(size=(300, 4)) + labels[:, None], rng.normal(size=(240, 4)) + ref_labels[:, None]
    predictions = np.where(labels == 2, 0, labels)  # class 2 always misclassified
    p = evaluation.panel(feats, labels, ref, ref_labels, predictions, num_classes=3)
    assert set(p) == {"kid", "intra_fd", "precision", "recall", "per_class"}
    assert p["per_class"]["class_acc"] == [1.0, 1.0, 0.0] and len(p["per_class"]["intra_fd"]) == 3
    assert p["kid"] == evaluation.kid(ref, feats) and (p["precision"], p["recall"]) == evaluation.precision_recall(ref, feats)
    assert torch.get_default_dtype() == torch.float32  # nothing global changed


def test_too_few_samples_give_none_not_an_error():
    """The harness allows 2 samples per evaluation: the panel then says what it cannot compute."""
    rng = np.random.default_rng(5)
    ref, ref_labels = rng.normal(size=(40, 4)), np.arange(40) % 2
    p = evaluation.panel(rng.normal(size=(3, 4)), np.array([0, 0, 1]), ref, ref_labels, num_classes=2)
    assert p["precision"] is None and p["recall"] is None  # 3 samples: no 3rd neighbour besides the point
    assert p["intra_fd"] is None and p["per_class"]["intra_fd"][1] is None and p["per_class"]["intra_fd"][0] > 0
    assert np.isfinite(p["kid"])
