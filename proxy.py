"""The digits proxy: a real 10-class image dataset that needs no download, and two metrics that rank
conditioning methods on a CPU.

* Data: scikit-learn's handwritten digits (1,797 real 8x8 images), split 80/20 stratified with a
  fixed seed, upsampled to 16x16 (bilinear, align_corners=False), quantised to uint8, replicated to
  3 channels so that the backbone and the conditioning code are exactly the CIFAR ones.
* A small CNN classifier trained on the train split (deterministic, seconds, cached under a hash of
  its recipe and code); it must reach >= 95% on the held-out split or the metrics refuse to run.
* ``proxy_fd``: Frechet distance (clean-fid's function) between the classifier's penultimate
  features of generated samples and of the real held-out images.
* ``class_acc``: fraction of generated samples the classifier assigns to their conditioning class.
* the class-conditional panel from the same features (evaluation.py): ``proxy_kid``,
  ``proxy_intra_fd`` (with 36 held-out digits per class: a noisy number), ``proxy_precision`` and
  ``proxy_recall``, and per class the intra-FD and class accuracy.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation import feature_distance, machine_lock, panel

DIGITS_SIZE = 16
SPLIT = dict(test_size=0.2, random_state=0)  # stratified by class
ACCURACY_FLOOR = 0.95
CLASSIFIER_RECIPE = dict(feature_dim=64, epochs=30, batch_size=64, lr=1e-3, max_shift=1, seed=0)


class ProxyError(Exception):
    """A proxy metric cannot be trusted (the classifier is too weak) or computed."""


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images [N, 3, 16, 16], int64 labels [N], class names, for split 'train' or 'held-out'."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    indices = np.arange(len(digits.target))
    train, held_out = train_test_split(indices, stratify=digits.target, **SPLIT)
    chosen = {"train": train, "held-out": held_out}[split]
    x = torch.from_numpy(digits.images[chosen] / 16.0).float()[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = (x * 255).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    return images.numpy(), digits.target[chosen].astype(np.int64), [str(d) for d in range(10)]


class DigitClassifier(nn.Module):
    """Two conv layers and a linear feature layer; ``features`` is the penultimate representation."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim))
        # features are taken before this ReLU: post-ReLU units that are dead on some inputs would make
        # the feature covariance singular
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, 10))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, 16, 16] -> (features [B, F], logits [B, 10])."""
        features = self.features(images.float() / 127.5 - 1)
        return features, self.head(features)


def train_classifier(recipe: dict) -> tuple[DigitClassifier, float]:
    """Train on the train split (random shifts of up to max_shift pixels), return it and its held-out accuracy."""
    images, labels, _ = load_digits("train")
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    g = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    model = DigitClassifier(recipe["feature_dim"])
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    s = recipe["max_shift"]
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(order), recipe["batch_size"]):
            idx = order[i:i + recipe["batch_size"]]
            dy, dx = torch.randint(-s, s + 1, (2,), generator=g).tolist()
            x = torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x)[1], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    held_images, held_labels, _ = load_digits("held-out")
    with torch.no_grad():
        predictions = model(torch.from_numpy(held_images))[1].argmax(1).numpy()
    return model, float((predictions == held_labels).mean())


# The source code the cached classifier depends on, read once at import.
_CLASSIFIER_CODE = "".join(inspect.getsource(f) for f in (DigitClassifier, train_classifier, load_digits))


def recipe_hash(recipe: dict) -> str:
    """Changes whenever the recipe, the split, or the classifier/training code changes."""
    text = json.dumps([recipe, SPLIT, DIGITS_SIZE], sort_keys=True) + _CLASSIFIER_CODE
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_classifier(cache_dir: Path, recipe: dict = CLASSIFIER_RECIPE) -> tuple[DigitClassifier, float]:
    """The cached classifier for this recipe, trained (and cached atomically, under a lock) on first use:
    parallel runs of a sweep (--jobs, torchrun ranks) that all find it missing train it once; the others
    wait, then load it."""
    path = Path(cache_dir) / f"digit_classifier_{recipe_hash(recipe)}.pt"
    with machine_lock("digits-classifier", cache_dir):
        if not path.exists():
            model, accuracy = train_classifier(recipe)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            torch.save({"state_dict": model.state_dict(), "accuracy": accuracy, "recipe": recipe}, tmp)
            os.replace(tmp, path)
    saved = torch.load(path, weights_only=True)
    model = DigitClassifier(recipe["feature_dim"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), float(saved["accuracy"])


def balanced_labels(n: int) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ...: every class equally often when n is a multiple of 10."""
    return torch.arange(n) % 10


class ProxyMetrics:
    """proxy_fd and class_acc of generated digits, against the held-out split, and the class-conditional
    panel from the same features (evaluation.py): proxy_kid, proxy_intra_fd, proxy_precision,
    proxy_recall, and per class the intra-FD and class accuracy."""

    def __init__(self, cache_dir: Path, device="cpu", recipe: dict = CLASSIFIER_RECIPE):
        self.classifier, self.accuracy = load_classifier(cache_dir, recipe)
        if self.accuracy < ACCURACY_FLOOR:
            raise ProxyError(f"the proxy classifier reaches only {self.accuracy:.3f} held-out accuracy (floor "
                             f"{ACCURACY_FLOOR}); its metrics would not be trustworthy")
        self.device = torch.device(device)
        self.classifier.to(self.device)
        held_out, self.reference_labels, _ = load_digits("held-out")
        self.reference = self.features(torch.from_numpy(held_out))[0]

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        feats, preds = [], []
        for i in range(0, len(images), batch_size):
            f, logits = self.classifier(images[i:i + batch_size].to(self.device))
            feats.append(f.double().cpu())
            preds.append(logits.argmax(1).cpu())
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """images: uint8 [N, 3, 16, 16] (quantised exactly as for FID); labels: their conditioning classes."""
        feats, predictions = self.features(images)
        p = panel(feats, labels.numpy(), self.reference, self.reference_labels, predictions)
        return dict(proxy_fd=feature_distance(feats, self.reference),
                    class_acc=float((predictions == labels.numpy()).mean()), proxy_samples=len(images),
                    classifier_accuracy=self.accuracy, proxy_kid=p["kid"], proxy_intra_fd=p["intra_fd"],
                    proxy_precision=p["precision"], proxy_recall=p["recall"], per_class=p["per_class"])
