"""The protocol's critical paths, each against a hand computation, so that a fault that would silently
change every published number fails here: the AdamW step (weight decay, clipping), the EMA rate,
which weights each evaluation samples, the flips, the FID statistics and the FID feature path, the data
order and labels of the training batches, the uniform training timesteps, and the deterministic DDIM sampler.

The runs go through custom_train.main; spies record what the harness computed with (the initial
weights, each step's model inputs and noise, the networks handed to the sampler), and the test
recomputes it by hand. The training batches and the sampler are called directly, with stand-ins that
show what they computed with: a noise scheduler that returns the clean images (whose pixels encode their
index), and a network whose eps is a known function of (x, t, y)."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import custom_train
import evaluation
from conftest import Spy

FAST = ["--scale", "tiny", "--ddim-steps", "2", "--grid-per-class", "1", "--sample-batch-size", "8", "--log-every", "1",
        "--heldout-draws", "0"]


def main(tmp_path, cifar_dir, *extra, method="concat-film"):
    return custom_train.main(FAST + ["--method", method, "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path / "runs"),
                                     *map(str, extra)])


def checkpoint(tmp_path, method="concat-film"):
    (path,) = (tmp_path / "runs").glob(f"tiny-{method}*-s42/checkpoint.pt")
    return torch.load(path, weights_only=False)


def test_adamw_step_with_clipping_and_decoupled_weight_decay_by_hand(tmp_path, cifar_dir, monkeypatch):
    """Two optimizer steps recomputed from the recorded batches: MSE on epsilon, the gradient norm clipped
    to --grad-clip, then AdamW (decoupled weight decay, bias-corrected moments, betas and eps of the
    protocol). The clip is set far below the gradient norm, so clipping is active at both steps."""
    spy = Spy(monkeypatch)
    lr, wd, clip = 1e-3, 0.1, 1e-4
    main(tmp_path, cifar_dir, "--steps", 2, "--batch-size", 4, "--fid", "off", "--lr", lr, "--weight-decay", wd,
         "--grad-clip", clip)
    ckpt = checkpoint(tmp_path)
    log = [json.loads(line) for line in (tmp_path / "runs/tiny-concat-film-s42/log.jsonl").read_text().splitlines()]

    model = spy.initial.train()
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    (b1, b2), eps = custom_train.ADAM_BETAS, custom_train.ADAM_EPS
    assert (b1, b2, eps) == (0.9, 0.999, 1e-8)
    for step, ((xt, t, y), noise) in enumerate(zip(spy.inputs, spy.noise), start=1):
        model.zero_grad()
        F.mse_loss(model(xt, t, y), noise).backward()
        norm = torch.sqrt(sum(p.grad.double().square().sum() for p in params)).item()
        assert norm > 100 * clip  # clipping is active
        assert log[step - 1]["grad_norm"] == pytest.approx(norm, rel=1e-4)  # the log reports the norm before clipping
        with torch.no_grad():
            for p, m_, v_ in zip(params, m, v):
                g = p.grad * min(1.0, clip / (norm + 1e-6))
                p.mul_(1 - lr * wd)
                m_.mul_(b1).add_(g, alpha=1 - b1)
                v_.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_(lr * (m_ / (1 - b1 ** step)) / ((v_ / (1 - b2 ** step)).sqrt() + eps))
    assert len(spy.inputs) == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(ckpt["model"][name], p.detach(), rtol=0, atol=2e-6, msg=name)
    # the test can tell: weight decay alone moves the weights by lr * wd * |w| ~ 1e-5, far above its tolerance
    decay = max((lr * wd * p.abs()).max().item() for p in spy.initial.parameters())
    assert decay > 10 * 2e-6


def test_ema_follows_its_rate_from_the_initial_copy(tmp_path, cifar_dir, monkeypatch):
    """ema_s = decay * ema_(s-1) + (1 - decay) * weights_s from ema_0 = the initial weights, every step."""
    spy = Spy(monkeypatch)
    decay = 0.7
    main(tmp_path, cifar_dir, "--steps", 3, "--batch-size", 4, "--fid", "off", "--ema-decay", decay, "--lr", 1e-2)
    ckpt = checkpoint(tmp_path)
    trajectory = spy.weights[1:] + [ckpt["model"]]  # the weights after steps 1, 2, 3
    assert len(trajectory) == 3
    for name, initial in spy.initial.state_dict().items():
        ema = initial.clone()
        for weights in trajectory:
            ema = decay * ema + (1 - decay) * weights[name]
        torch.testing.assert_close(ckpt["ema"][name], ema, rtol=0, atol=1e-6, msg=name)
    moved = max((ckpt["ema"][k] - v).abs().max().item() for k, v in spy.initial.state_dict().items())
    assert moved > 1e-3  # the EMA left its initial copy: an untrained EMA would fail the comparison


def test_the_ema_is_a_frozen_copy_that_averages_float_buffers_and_copies_the_rest():
    """The copy never asks for gradients (no autograd graph or grad memory on it), and its update moves
    parameters and floating-point buffers by (1 - decay) and copies integer buffers."""
    model = torch.nn.BatchNorm1d(3)  # a float buffer (running_mean) and an integer one (num_batches_tracked)
    ema = custom_train.EMA(model, 0.75)
    assert not any(p.requires_grad for p in ema.module.parameters()) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(4.0)
        model.num_batches_tracked.fill_(7)
    ema.update()
    assert torch.equal(ema.module.weight, torch.full((3,), 1.25))  # 1 + 0.25 * (2 - 1)
    assert torch.equal(ema.module.running_mean, torch.full((3,), 1.0)) and ema.module.num_batches_tracked.item() == 7


def test_each_evaluation_samples_the_weights_the_protocol_names(tmp_path, cifar_dir, monkeypatch):
    """Before --ema-eval-start the raw network, from it on the EMA, and the final evaluation the EMA:
    checked on both sides of the boundary, against the weights the training actually had."""
    spy = Spy(monkeypatch)
    sampled = []  # the weights of every sampling call, in order (with --fid off: one grid per evaluation)
    real_sample = custom_train.sample

    def recording_sample(net, labels, **kwargs):
        sampled.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return real_sample(net, labels, **kwargs)
    monkeypatch.setattr(custom_train, "sample", recording_sample)
    decay = 0.5
    main(tmp_path, cifar_dir, "--steps", 3, "--batch-size", 4, "--fid", "off", "--eval-every", 1,
         "--ema-eval-start", 2, "--ema-decay", decay, "--lr", 1e-2)
    ckpt = checkpoint(tmp_path)
    raw = spy.weights[1:] + [ckpt["model"]]  # after steps 1, 2, 3
    ema = [spy.initial.state_dict()]
    for weights in raw:
        ema.append({k: decay * ema[-1][k] + (1 - decay) * weights[k] for k in weights})
    log = [json.loads(line) for line in (tmp_path / "runs/tiny-concat-film-s42/log.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval"], r["weights"]) for r in log if "eval" in r]
    assert evals == [(1, "step000001", "raw"), (2, "step000002", "ema"), (3, "step000003", "ema"), (3, "final", "ema")]
    expected = [raw[0], ema[2], ema[3], ema[3]]
    other = [ema[1], raw[1], raw[2], raw[2]]
    assert len(sampled) == len(expected)
    for (step, tag, _), got, want, wrong in zip(evals, sampled, expected, other):
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=f"{tag}: {name}")
        assert max((got[k] - wrong[k]).abs().max().item() for k in want) > 1e-4, tag  # the sides differ


def test_flips_are_on_for_cifar10_with_both_sides_in_the_batches(tmp_path, cifar_dir, monkeypatch):
    spy = Spy(monkeypatch)
    images, _, _ = custom_train.load_cifar10(cifar_dir)
    main(tmp_path, cifar_dir, "--steps", 4, "--batch-size", 8, "--fid", "off")
    as_is = {img.tobytes() for img in images}
    mirrored = {img[:, :, ::-1].tobytes() for img in images}
    assert not as_is & mirrored  # the look-alike images are not symmetric: a flip is visible
    seen = [np.round((x.numpy() + 1) * 127.5).astype(np.uint8).tobytes() for batch in spy.x0 for x in batch]
    assert all(s in as_is or s in mirrored for s in seen)
    flipped = sum(s in mirrored for s in seen)
    assert len(seen) == 32 and 4 <= flipped <= 28  # about half, both sides present


def test_flips_are_off_for_digits(tmp_path, monkeypatch):
    import proxy

    spy = Spy(monkeypatch)
    images, _, _ = proxy.load_digits("train")
    custom_train.main(["--preset", "demo", "--steps", "4", "--batch-size", "16", "--fid", "off", "--ddim-steps", "2",
                       "--grid-per-class", "1", "--out-dir", str(tmp_path), "--method", "concat-film", "--heldout-draws", "0"])
    as_is = {img.tobytes() for img in images}
    asymmetric = {img.tobytes() for img in images if not np.array_equal(img, img[:, :, ::-1])}
    seen = [np.round((x.numpy() + 1) * 127.5).astype(np.uint8).tobytes() for batch in spy.x0 for x in batch]
    assert len(seen) == 64 and all(s in as_is for s in seen)
    assert sum(s in asymmetric for s in seen) > 50  # a mirrored one of these would not be in the data set


def test_online_and_offline_routes_use_the_cifar10_train_statistics(tmp_path, monkeypatch, stand_in_fid):
    """clean-fid's online route asks for the CIFAR-10 *train* statistics at 32 in clean mode; the offline
    route (--prefetch downloads, --fid-cache reads) fetches the same URL and reads that file, even with
    the test statistics beside it."""
    stand_in_fid.write_stats(np.zeros((4, 3, 32, 32), np.uint8) + np.arange(4, dtype=np.uint8)[:, None, None, None] * 60)
    evaluation.CleanFID(torch.device("cpu"))
    (online_url,) = stand_in_fid.requested
    assert online_url.startswith("https://www.cs.cmu.edu/~clean-fid/stats/")
    assert online_url.rsplit("/", 1)[1] == "cifar10_clean_train_32.npz"
    assert evaluation.FID_STATS_URL == online_url  # what --prefetch downloads

    cache = tmp_path / "fid"
    cache.mkdir()
    (cache / evaluation.INCEPTION_FILE).write_bytes(b"stand-in")
    np.savez(cache / "cifar10_clean_train_32.npz", mu=np.full(3, 1.0), sigma=np.eye(3))
    np.savez(cache / "cifar10_clean_test_32.npz", mu=np.full(3, 2.0), sigma=np.eye(3))
    monkeypatch.setattr(evaluation, "load_fid_extractor", lambda device, fid_cache=None: stand_in_fid.extractor)
    offline = evaluation.CleanFID(torch.device("cpu"), cache)
    np.testing.assert_array_equal(offline.ref_mu, np.full(3, 1.0))


@pytest.mark.parametrize("resize", ["pil", "torch"])
def test_every_image_reaches_the_feature_extractor(resize, monkeypatch, stand_in_fid):
    """70 images in batches of 32: the FID equals the Frechet distance of the features of all 70 (each
    resized by clean-fid's resizer), not of the first batch, nor of wrapped-around repeats."""
    from cleanfid.fid import frechet_distance
    from cleanfid.resize import build_resizer

    g = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (50, 3, 32, 32), generator=g, dtype=torch.uint8)
    stand_in_fid.write_stats(reference.numpy())
    images = torch.randint(0, 256, (70, 3, 32, 32), generator=g, dtype=torch.uint8)
    images[:32] //= 4  # the first batch differs from the rest: scoring it alone gives another number
    seen = []
    extractor = stand_in_fid.extractor

    def recording(x):
        seen.append(len(x))
        return extractor(x)
    monkeypatch.setattr(evaluation, "load_fid_extractor", lambda device, fid_cache=None: recording)
    ported = []  # the torch port runs only when asked for (it is a deviation); clean-fid's own resize otherwise
    real_port = evaluation.clean_resize_torch
    monkeypatch.setattr(evaluation, "clean_resize_torch", lambda x: ported.append(len(x)) or real_port(x))
    fid = evaluation.CleanFID(torch.device("cpu"), resize=resize)
    got = fid(images, torch.zeros(70, dtype=torch.long), batch_size=32)
    assert ported == ([32, 32, 6] if resize == "torch" else [])

    pil = build_resizer("clean")
    resized = torch.from_numpy(np.stack([pil(img.permute(1, 2, 0).numpy()).transpose(2, 0, 1) for img in images]))
    feats = extractor(resized).double().numpy()
    expected = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), fid.ref_mu, fid.ref_sigma)
    first = feats[:32]
    first_only = frechet_distance(first.mean(0), np.cov(first, rowvar=False), fid.ref_mu, fid.ref_sigma)
    assert sum(seen) >= 70 and got["fid_samples"] == 70
    assert got["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert abs(first_only - expected) > 100 * max(abs(expected) * 1e-4, 1e-6)  # the check can tell them apart


# --- The training batches: the data order, the labels, the timesteps --------------------------------------------

class PassThroughNoise:
    """A noise scheduler whose add_noise returns the clean images, so a batch shows which images it holds;
    it records (x0, noise, t) of every call."""

    def __init__(self):
        self.calls = []

    def add_noise(self, x0, noise, t):
        self.calls.append((x0.detach().clone(), noise.detach().clone(), t.detach().clone()))
        return x0


def indexed_images(n, size=4):
    """uint8 images [n, 3, size, size]: channel 0 holds the image's index, channel 1 a left-to-right ramp
    (so a flip is visible and never changes the index read back)."""
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    images[:, 1] = (torch.arange(size) * 50).to(torch.uint8)
    return images


def batch_args(batch_size, seed=7, hflip=True, image_size=4):
    return SimpleNamespace(seed=seed, batch_size=batch_size, hflip=hflip, image_size=image_size, channels_last=False, cfg_dropout=0.0)


def take(batches, step):
    """Step `step`'s (xt, t, y, noise), cloned: the batches may come back in the same buffers every call."""
    return tuple(v.detach().clone() for v in batches(step))


def test_training_batches_walk_each_epochs_permutation_with_their_labels():
    """Step s holds the images epoch_order(seed, e, n)[k*B:(k+1)*B] (e, k = divmod(s - 1, n // B): the
    incomplete last batch is dropped), read back from pixels that encode each image's index; each label is
    its image's (labels here are unique, so any mismatch shows); every image at most once per epoch, each
    epoch in another order; the same batch when a step is asked for alone (resume), and 2 ranks' slices
    side by side are the 1-process batch."""
    n, B, epochs = 53, 8, 3
    per_epoch = n // B  # 6 batches; 5 images dropped each epoch
    images = indexed_images(n)
    labels = 1000 + torch.randperm(n, generator=torch.Generator().manual_seed(0))
    args = batch_args(B)
    batches = custom_train.TrainingBatches(images, labels, args, 0, 1, PassThroughNoise())
    steps = range(1, epochs * per_epoch + 3)  # into a fourth epoch
    got = {s: take(batches, s) for s in steps}

    used = {}
    for s, (x, t, y, noise) in got.items():
        idx = torch.round((x[:, 0, 0, 0].double() + 1) * 127.5).long()
        clean = images[idx].float() / 127.5 - 1
        for i in range(B):  # the whole image, as it is or mirrored: the index read back is the image's
            assert torch.equal(x[i], clean[i]) or torch.equal(x[i], clean[i].flip(2)), (s, i)
        assert torch.equal(y, labels[idx]), f"step {s}: the labels are not their images'"
        epoch, k = divmod(s - 1, per_epoch)
        expected = custom_train.epoch_order(args.seed, epoch, n)[k * B:(k + 1) * B]
        assert idx.tolist() == expected.tolist(), f"step {s}"
        used.setdefault(epoch, []).extend(idx.tolist())
    for epoch in range(epochs):
        assert len(used[epoch]) == per_epoch * B and len(set(used[epoch])) == per_epoch * B  # once each, 5 left out
    assert len({tuple(u) for e, u in used.items() if e < epochs}) == epochs  # each epoch its own order
    for s in steps[1:]:
        assert not torch.equal(got[s][0], got[s - 1][0])  # successive steps see other images

    fresh = custom_train.TrainingBatches(images, labels, args, 0, 1, PassThroughNoise())
    for s in [13, 2, 20, 7]:  # out of order, as after a resume
        assert all(torch.equal(a, b) for a, b in zip(take(fresh, s), got[s])), s

    ranks = [custom_train.TrainingBatches(images, labels, args, r, 2, PassThroughNoise()) for r in range(2)]
    for s in steps:
        halves = [take(r, s) for r in ranks]
        for part, (h0, h1), whole in zip(["xt", "t", "y", "noise"], zip(*halves), got[s]):
            assert len(h0) == B // 2 and torch.equal(torch.cat([h0, h1]), whole), f"step {s}: {part}"


def test_training_timesteps_are_uniform_over_all_1000_values():
    """t is uniform on {0, ..., 999}, both ends included, drawn afresh each step: 100,000 draws (4 steps of
    25,000) reach every value and pass a chi-square test of uniformity (a draw over 1..999 or 0..998 misses
    an end; a non-uniform one fails the test). The t returned is the t the noise was added at, and the
    noise returned the noise added."""
    from scipy.stats import chisquare

    B, steps = 25_000, 4
    images = torch.zeros(B, 3, 1, 1, dtype=torch.uint8)
    noise_scheduler = PassThroughNoise()
    batches = custom_train.TrainingBatches(images, torch.zeros(B, dtype=torch.long), batch_args(B, image_size=1), 0, 1,
                                           noise_scheduler)
    drawn = []
    for s in range(1, steps + 1):
        _, t, _, noise = take(batches, s)
        _, added, at = noise_scheduler.calls[-1]
        assert torch.equal(t, at) and torch.equal(noise, added)
        assert not t.is_floating_point() and t.shape == (B,)
        drawn.append(t)
    assert all(not torch.equal(a, b) for a, b in zip(drawn, drawn[1:]))
    t = torch.cat(drawn)
    assert t.min().item() == 0 and t.max().item() == custom_train.TRAIN_TIMESTEPS - 1 == 999
    counts = np.bincount(t.numpy(), minlength=1000)
    assert len(counts) == 1000 and (counts > 0).all()
    p = chisquare(counts).pvalue
    assert p > 1e-4, f"chi-square p = {p:.3g}: not uniform (counts {counts.min()} to {counts.max()})"


# --- Sampling: deterministic DDIM, recomputed step by step ------------------------------------------------------

class KnownEps(torch.nn.Module):
    """A stand-in network: eps is a known function of (x, t, y); it records each call's x, t, y and eps."""

    def __init__(self):
        super().__init__()
        self.unit = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    @staticmethod
    def eps(x, t, y):
        return 0.6 * x + 0.3 * torch.sin(3 * x + t / 100) + 0.05 * (y.reshape(-1, 1, 1, 1).to(x.dtype) - 4.5)

    def forward(self, x, t, y):
        eps = self.unit * self.eps(x, float(t), y)
        self.calls.append(dict(x=x.detach().double().cpu(), t=int(t), y=y.detach().cpu().clone(),
                               eps=eps.detach().double().cpu()))
        return eps


def ddim_by_hand(x, eps, t, num_steps, clip=True):
    """One deterministic DDIM step (eta 0) in float64 from numpy's own linear betas: x0 predicted from eps and
    clipped to [-1, 1], then moved to the previous timestep t - 1000 // num_steps along the same eps; before
    t = 0 the previous alpha is alphas_cumprod[0] (set_alpha_to_one=False). Returns (x_prev, x0 unclipped)."""
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    prev = t - 1000 // num_steps
    a, a_prev = alphas_cumprod[t], alphas_cumprod[prev] if prev >= 0 else alphas_cumprod[0]
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    x0_used = x0.clamp(-1, 1) if clip else x0
    return np.sqrt(a_prev) * x0_used + np.sqrt(1 - a_prev) * eps, x0


RANDOM_DRAWS = [(torch, name) for name in ["randn", "randn_like", "rand", "rand_like", "randint", "randint_like", "normal",
                                           "randperm", "bernoulli", "multinomial", "poisson"]] + \
               [(torch.Tensor, name) for name in ["normal_", "uniform_", "random_", "bernoulli_", "exponential_",
                                                  "geometric_", "log_normal_", "cauchy_"]]


def count_random_draws(monkeypatch):
    """Count every call of torch's random functions (and Tensor's in-place ones): a list of (name, shape)."""
    draws = []
    for owner, name in RANDOM_DRAWS:
        real = getattr(owner, name)

        def counted(*a, _real=real, _name=name, **kw):
            out = _real(*a, **kw)
            draws.append((_name, tuple(out.shape)))
            return out
        monkeypatch.setattr(owner, name, counted)
    return draws


@pytest.mark.parametrize("num_steps", [50, 10])
def test_sampling_is_deterministic_ddim_with_clipping_by_hand(num_steps, monkeypatch):
    """Every step of sample() against the DDIM update computed by hand from the x and eps the network saw:
    eta 0, the x0 prediction clipped to [-1, 1] (the network's eps is chosen so that the prediction leaves
    it: an unclipped update would be far off), the "leading" timesteps (980, 960, ..., 0 for 50 steps), the
    last step to alphas_cumprod[0]; the images are the quantized last x. Each batch starts from the noise of
    its generator (seed, tag, b) and draws no other random number: one draw per batch, the global RNGs
    untouched, and the same images whatever the global seed."""
    seed, tag, B, size = 3, "fid", 4, 8
    labels = torch.tensor([0, 3, 9, 1, 5, 7])  # 2 batches: 4 and 2
    kw = dict(seed=seed, tag=tag, batch_size=B, ddim_steps=num_steps, image_size=size, amp_dtype=None,
              device=torch.device("cpu"))
    initial = [torch.randn((n, 3, size, size), generator=custom_train.generator("cpu", seed, tag, b))
               for b, n in enumerate([4, 2])]
    model = KnownEps()
    draws = count_random_draws(monkeypatch)
    torch.manual_seed(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    images = custom_train.sample(model, labels, **kw)
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert draws == [("randn", (4, 3, size, size)), ("randn", (2, 3, size, size))]  # the initial noise, nothing after
    monkeypatch.undo()

    ratio = 1000 // num_steps
    timesteps = [k * ratio for k in reversed(range(num_steps))]
    if num_steps == 50:
        assert timesteps == list(range(980, -1, -20))
    assert images.dtype == torch.uint8 and images.shape == (6, 3, size, size)
    assert len(model.calls) == 2 * num_steps
    clipped = unclipped_error = 0
    for b in range(2):
        calls = model.calls[b * num_steps:(b + 1) * num_steps]
        y = labels[b * B:(b + 1) * B]
        assert [c["t"] for c in calls] == timesteps
        assert torch.equal(calls[0]["x"], initial[b].double())
        for i, c in enumerate(calls):
            assert torch.equal(c["y"], y)
            torch.testing.assert_close(c["eps"], KnownEps.eps(c["x"], c["t"], y), rtol=0, atol=1e-5)
            x_prev, x0 = ddim_by_hand(c["x"], c["eps"], c["t"], num_steps)
            if i + 1 < num_steps:
                torch.testing.assert_close(calls[i + 1]["x"], x_prev, rtol=1e-5, atol=1e-5, msg=f"batch {b}, t={c['t']}")
                clipped += (x0.abs() > 1).sum().item()
                unclipped = ddim_by_hand(c["x"], c["eps"], c["t"], num_steps, clip=False)[0]
                unclipped_error = max(unclipped_error, (unclipped - calls[i + 1]["x"]).abs().max().item())
        # the last step's x is seen only through the images: quantized exactly, but for values within rounding
        # of a level boundary
        level = ((x_prev * 0.5 + 0.5) * 255).clamp(0, 255)
        expected = level.floor()
        got = images[b * B:(b + 1) * B].double()
        near = (level - level.round()).abs() < 1e-3
        assert torch.equal(got[~near], expected[~near]) and (got - expected).abs().max() <= 1, f"batch {b}"
        assert near.double().mean() < 0.05
    assert clipped > 0 and unclipped_error > 1  # clipping is active: without it the steps land elsewhere

    torch.manual_seed(1)
    assert torch.equal(custom_train.sample(KnownEps(), labels, **kw), images)  # another global seed, the same images
