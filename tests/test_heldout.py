"""The held-out metrics against models whose answers are known: an oracle that knows each class's image
(its loss is exactly its added error; it classifies perfectly), a model that ignores the class (chance),
and the draws: the same for every method and training seed, fixed by --metric-seed alone."""
import math

import numpy as np
import pytest
import torch

import custom_train

PER_CLASS = 20


@pytest.fixture(scope="module")
def prototypes():
    """A held-out set of 10 classes whose images are all equal to their class's prototype (3 x 8 x 8)."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randint(0, 256, (10, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(10).repeat(PER_CLASS)
    return protos, protos[labels].numpy(), labels.numpy()


class ClassOracle(torch.nn.Module):
    """Predicts the noise exactly when told the true class (it knows every class's image), plus `offset`;
    with `ignore_label`, it assumes the mean image whatever the class, plus a small perturbation that is a
    pseudo-random function of (input, label): the label changes the output, but not in a way related
    to the image's class."""

    def __init__(self, protos, offset=None, ignore_label=False):
        super().__init__()
        self.protos = protos.float() / 127.5 - 1
        self.alphas = custom_train.ddpm_scheduler().alphas_cumprod
        self.offset = torch.zeros(3, 8, 8) if offset is None else offset
        self.ignore_label = ignore_label

    def forward(self, xt, t, y):
        ab = self.alphas[t].view(-1, 1, 1, 1)
        x0 = self.protos.mean(0, keepdim=True) if self.ignore_label else self.protos[y]
        eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.ignore_label:
            return eps + 1e-3 * torch.sin(1e3 * (xt.flatten(1).sum(1) + 17.0 * y)).view(-1, 1, 1, 1)
        return eps + self.offset


def metrics(images, labels, **kw):
    kw = dict(dict(draws=4, label_draws=2, metric_seed=0, batch_size=64), **kw)
    return custom_train.HeldOutMetrics(images, labels, torch.device("cpu"), **kw)


def test_the_loss_of_a_known_model(prototypes):
    """The oracle's prediction error is exactly its offset, whatever the image, t and noise: heldout_loss
    is the offset's mean square; with no offset it classifies every draw right."""
    protos, images, labels = prototypes
    offset = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.1
    got = metrics(images, labels)(ClassOracle(protos, offset))
    assert got["heldout_loss"] == pytest.approx(offset.square().mean().item(), rel=1e-4)
    perfect = metrics(images, labels, label_draws=3)(ClassOracle(protos))
    assert perfect["heldout_loss"] < 1e-9 and perfect["label_acc"] == 1.0


def test_a_model_that_ignores_the_label_classifies_at_chance(prototypes):
    protos, images, labels = prototypes
    got = metrics(images, labels, label_draws=4)(ClassOracle(protos, ignore_label=True))
    trials = len(labels) * 4
    assert abs(got["label_acc"] - 0.1) < 3.5 * math.sqrt(0.1 * 0.9 / trials)  # binomial noise, 800 trials


def test_draws_are_fixed_by_the_metric_seed_alone(prototypes):
    protos, images, labels = prototypes
    a, b = metrics(images, labels), metrics(images, labels)
    for kind in ("loss", "label"):
        t1, n1 = a.chunk_draws(kind, 0, 100, 4)
        t2, n2 = b.chunk_draws(kind, 0, 100, 4)
        assert torch.equal(t1, t2) and torch.equal(n1, n2)
        # stratified: draw k of every image lies in [250 k, 250 (k + 1))
        assert ((t1 >= torch.arange(4) * 250) & (t1 < (torch.arange(4) + 1) * 250)).all()
    other = metrics(images, labels, metric_seed=1).chunk_draws("loss", 0, 100, 4)[1]
    assert not torch.equal(other, n1)


def test_every_method_and_training_seed_meets_the_same_draws(tmp_path, monkeypatch):
    """Through two digits runs of different methods and training seeds, each evaluated at step 1 and
    at the end: the held-out evaluation feeds both the same (t, noise) pairs; the metrics are in every
    evaluation, and `report.py curves` draws them against the step. (60 held-out digits in chunks of 20
    keep it quick; the chunking is the same code as for all 360.)"""
    import report

    real_load = custom_train.load_dataset
    monkeypatch.setattr(custom_train, "load_dataset", lambda args, split="train": tuple(
        part[:60] if split != "train" and i < 2 else part for i, part in enumerate(real_load(args, split))))
    monkeypatch.setattr(custom_train.HeldOutMetrics, "CHUNK", 20)
    seen = []
    real = custom_train.HeldOutMetrics.losses

    def recording(self, model, x0, t, noise, labels, amp_dtype):
        seen[-1].append((x0.clone(), t.clone(), noise.clone()))
        return real(self, model, x0, t, noise, labels, amp_dtype)
    monkeypatch.setattr(custom_train.HeldOutMetrics, "losses", recording)
    results = []
    for method, seed in (("concat-film", 42), ("adanorm", 7)):
        seen.append([])
        results.append(custom_train.main(
            ["--preset", "demo", "--steps", "2", "--batch-size", "8", "--fid", "off", "--ddim-steps", "2",
             "--grid-per-class", "1", "--heldout-draws", "2", "--label-draws", "1", "--method", method, "--seed",
             str(seed), "--out-dir", str(tmp_path), "--eval-every", "1"]))
    assert len(seen[0]) == len(seen[1]) == 2 * 3 * 11  # 2 evaluations (step 1, final) x 3 chunks of 20 x (loss, 10 labels)
    for (x1, t1, n1), (x2, t2, n2) in zip(*seen):
        assert torch.equal(x1, x2) and torch.equal(t1, t2) and torch.equal(n1, n2)
    for r in results:
        assert 0 < r["heldout_loss"] < 2 and 0 <= r["label_acc"] <= 1
        assert [e["step"] for e in r["evals"]] == [1, 2] and r["evals"][-1]["heldout_loss"] == r["heldout_loss"]
        assert all(e["heldout_loss"] > 0 and e["label_acc"] is not None for e in r["evals"])
    panels = report.curves_plot(report.collect(tmp_path), tmp_path / "curves.png")
    assert panels == ["loss", "heldout_loss", "label_acc"] and (tmp_path / "curves.png").stat().st_size > 10_000
    final_only = report.collect(tmp_path)  # runs evaluated only at the end still show their metrics, as points
    for r in final_only:
        r["evals"] = r["evals"][-1:]
    assert report.curves_plot(final_only, tmp_path / "final.png") == ["loss", "heldout_loss", "label_acc"]
    assert np.isfinite([r["heldout_loss"] for r in results]).all() and results[0]["heldout_loss"] != results[1]["heldout_loss"]
