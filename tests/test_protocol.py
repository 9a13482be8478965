"""The protocol's critical paths, each against a hand computation, so that a fault that would silently
change every published number fails here: the AdamW step (weight decay, clipping), the EMA rate,
which weights each evaluation samples, the flips, the FID statistics and the FID feature path.

The runs go through custom_train.main; spies record what the harness computed with (the initial
weights, each step's model inputs and noise, the networks handed to the sampler), and the test
recomputes it by hand."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import custom_train
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
    custom_train.CleanFID(torch.device("cpu"))
    (online_url,) = stand_in_fid.requested
    assert online_url.startswith("https://www.cs.cmu.edu/~clean-fid/stats/")
    assert online_url.rsplit("/", 1)[1] == "cifar10_clean_train_32.npz"
    assert custom_train.FID_STATS_URL == online_url  # what --prefetch downloads

    cache = tmp_path / "fid"
    cache.mkdir()
    (cache / custom_train.INCEPTION_FILE).write_bytes(b"stand-in")
    np.savez(cache / "cifar10_clean_train_32.npz", mu=np.full(3, 1.0), sigma=np.eye(3))
    np.savez(cache / "cifar10_clean_test_32.npz", mu=np.full(3, 2.0), sigma=np.eye(3))
    monkeypatch.setattr(custom_train, "load_fid_extractor", lambda device, fid_cache=None: stand_in_fid.extractor)
    offline = custom_train.CleanFID(torch.device("cpu"), cache)
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
    monkeypatch.setattr(custom_train, "load_fid_extractor", lambda device, fid_cache=None: recording)
    ported = []  # the torch port runs only when asked for (it is a deviation); clean-fid's own resize otherwise
    real_port = custom_train.clean_resize_torch
    monkeypatch.setattr(custom_train, "clean_resize_torch", lambda x: ported.append(len(x)) or real_port(x))
    fid = custom_train.CleanFID(torch.device("cpu"), resize=resize)
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
