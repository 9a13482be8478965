"""The class-conditional metric panel: what FID cannot see, from the same features FID uses.

FID compares the whole sample set with the whole data set and never looks at labels, so a model that
ignores its class, or draws each class from a few modes, can score well. From one feature pass over the
samples (and their conditioning labels) the panel adds:

* KID (Binkowski et al. 2018): the unbiased MMD^2 between the feature sets with the cubic polynomial kernel,
  by clean-fid's own `kernel_distance`: the mean over 100 random subsets of min(n_a, n_b, 1000) features
  of each set, the subsets drawn from a fixed seed, so that a score is reproducible;
* intra-FD: the Frechet distance within each class, between the samples conditioned on that class and
  the reference images of that class, and its mean over the classes (the intra-FID of the conditional-GAN
  literature, when the features are Inception's);
* precision and recall (Kynkaanniemi et al. 2019, k = 3): the fraction of samples inside the reference
  manifold (the union of balls around each reference feature reaching its k-th nearest reference
  neighbour), and the fraction of references inside the samples' manifold; distances in chunks, so that
  n x n of them never sit in memory at once.

The digits proxy (proxy.py) reports them from its classifier's features.
"""
from __future__ import annotations

import numpy as np
import torch

KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
PR_NEIGHBOURS = 3


def feature_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets, by clean-fid's own function."""
    from cleanfid.fid import frechet_distance

    mu_a, sigma_a = feats_a.mean(0), np.cov(feats_a, rowvar=False)
    mu_b, sigma_b = feats_b.mean(0), np.cov(feats_b, rowvar=False)
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def kid(feats_a: np.ndarray, feats_b: np.ndarray, seed: int = 0, num_subsets: int = KID_SUBSETS,
        max_subset_size: int = KID_SUBSET_SIZE) -> float:
    """clean-fid's kernel_distance; it draws its subsets from numpy's global generator, which is seeded
    for the call and then put back as it was."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(feats_a, feats_b, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def intra_fd(feats: np.ndarray, labels: np.ndarray, ref_feats: np.ndarray, ref_labels: np.ndarray,
             num_classes: int = 10) -> tuple[float, list[float]]:
    """(the mean over classes, each class's) Frechet distance between the samples conditioned on a class
    and the references of that class; None where a class has fewer than 2 of either (no covariance). With
    fewer features per class than dimensions the covariances are singular: scipy's warning about it is
    silenced, and the number is noisier (clean-fid's sqrtm copes)."""
    import warnings

    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        per_class = [feature_distance(feats[labels == c], ref_feats[ref_labels == c])
                     if min((labels == c).sum(), (ref_labels == c).sum()) >= 2 else None for c in range(num_classes)]
    return (None if None in per_class else float(np.mean(per_class))), per_class


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour in its own set (itself, at 0, not counted)."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """The fraction of points within the radius of at least one centre."""
    hits = [(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1) for i in range(0, len(points), chunk)]
    return torch.cat(hits).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS, chunk: int = 1000,
                     device="cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of `fake` against `real` features; None for
    both when either set has no k-th neighbour (k + 1 features or fewer)."""
    if min(len(real), len(fake)) <= k:
        return None, None
    real_t = torch.as_tensor(real, dtype=torch.float64 if torch.device(device).type == "cpu" else torch.float32,
                             device=device)
    fake_t = torch.as_tensor(fake, dtype=real_t.dtype, device=device)
    precision = _inside(fake_t, real_t, _kth_neighbour_radii(real_t, k, chunk), chunk)
    recall = _inside(real_t, fake_t, _kth_neighbour_radii(fake_t, k, chunk), chunk)
    return precision, recall


def panel(feats: np.ndarray, labels: np.ndarray, ref_feats: np.ndarray, ref_labels: np.ndarray,
          predictions: np.ndarray | None = None, num_classes: int = 10, device="cpu") -> dict:
    """Every metric of the panel, with the per-class numbers (intra-FD, and class accuracy when a
    classifier's `predictions` of the samples are given) under "per_class"."""
    mean_fd, per_class_fd = intra_fd(feats, labels, ref_feats, ref_labels, num_classes)
    precision, recall = precision_recall(ref_feats, feats, device=device)
    out = dict(kid=kid(ref_feats, feats), intra_fd=mean_fd, precision=precision, recall=recall,
               per_class=dict(intra_fd=per_class_fd))
    if predictions is not None:
        out["per_class"]["class_acc"] = [float((predictions[labels == c] == c).mean()) for c in range(num_classes)]
    return out
