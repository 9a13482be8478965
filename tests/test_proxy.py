"""The digits proxy: the split, the classifier's floor and cache, the metrics against hand-checked
values, a digits run end to end, and the seed aggregation of the comparison."""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import custom_train
import proxy
import report
from conftest import ROOT


def test_split_is_fixed_stratified_and_upsampled():
    from sklearn.datasets import load_digits

    train, train_labels, names = proxy.load_digits("train")
    held, held_labels, _ = proxy.load_digits("held-out")
    assert train.shape == (1437, 3, 16, 16) and held.shape == (360, 3, 16, 16) and train.dtype == np.uint8
    assert names == [str(d) for d in range(10)]
    assert np.array_equal(train[:, 0], train[:, 1]) and np.array_equal(train[:, 0], train[:, 2])
    counts_train, counts_held = np.bincount(train_labels), np.bincount(held_labels)
    assert np.all(np.abs(counts_held - 0.2 * (counts_train + counts_held)) <= 1)  # stratified 80/20
    again, again_labels, _ = proxy.load_digits("train")
    assert np.array_equal(train, again) and np.array_equal(train_labels, again_labels)
    # the filter is what the docstring says: bilinear 8 -> 16 on [0, 1] values, then rounded to uint8
    digits = load_digits()
    match = np.where((digits.target == held_labels[0]))[0]
    upsampled = [(F.interpolate(torch.from_numpy(digits.images[i] / 16.0).float()[None, None], size=(16, 16),
                                mode="bilinear", align_corners=False)[0, 0] * 255).round().to(torch.uint8).numpy()
                 for i in match]
    assert any(np.array_equal(u, held[0, 0]) for u in upsampled)
    # no image is in both splits
    train_set = {img.tobytes() for img in train[:, 0]}
    assert not any(img.tobytes() in train_set for img in held[:, 0])


@pytest.fixture
def metrics(digits_metrics):
    return digits_metrics


def test_classifier_clears_the_floor_and_is_cached(metrics, tmp_path, monkeypatch):
    assert metrics.accuracy >= proxy.ACCURACY_FLOOR
    assert len(list(metrics.cache_dir.glob("digit_classifier_*.pt"))) == 1
    monkeypatch.setattr(proxy, "train_classifier", lambda recipe: pytest.fail("retrained despite the cache"))
    model, accuracy = proxy.load_classifier(metrics.cache_dir)
    assert accuracy == metrics.accuracy
    assert proxy.recipe_hash(dict(proxy.CLASSIFIER_RECIPE, epochs=29)) != proxy.recipe_hash(proxy.CLASSIFIER_RECIPE)


def test_runs_that_find_the_classifier_missing_together_train_it_once(tmp_path, monkeypatch):
    """A sweep's parallel runs (or torchrun's ranks) start together on an empty cache: one trains, under the
    lock, while the others wait, then load what it saved."""
    trained = []

    def slow_training(recipe):
        trained.append(recipe)
        time.sleep(0.3)  # long enough that the others arrive while it trains
        return proxy.DigitClassifier(recipe["feature_dim"]).eval(), 0.5

    monkeypatch.setattr(proxy, "train_classifier", slow_training)
    with ThreadPoolExecutor(3) as pool:
        accuracies = list(pool.map(lambda _: proxy.load_classifier(tmp_path)[1], range(3)))
    assert len(trained) == 1 and accuracies == [0.5] * 3


def test_weak_classifier_is_refused(tmp_path):
    weak = dict(proxy.CLASSIFIER_RECIPE, epochs=0)  # untrained: chance accuracy
    with pytest.raises(proxy.ProxyError, match=r"reaches only 0\.\d+ held-out accuracy \(floor 0\.95\)"):
        proxy.ProxyMetrics(tmp_path, recipe=weak)


def test_metrics_on_real_held_out_images(metrics):
    held, labels, _ = proxy.load_digits("held-out")
    images, labels = torch.from_numpy(held), torch.from_numpy(labels)
    right = metrics(images, labels)
    assert right["class_acc"] == pytest.approx(metrics.accuracy) and abs(right["proxy_fd"]) < 1e-6
    assert right["proxy_samples"] == 360
    wrong = metrics(images, (labels + 1) % 10)
    assert wrong["class_acc"] < 0.05
    noise = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert metrics(noise, labels)["proxy_fd"] > 10 * max(right["proxy_fd"], 1e-3)
    # the panel: the held-out digits against themselves are the reference exactly, class by class
    assert right["proxy_precision"] == right["proxy_recall"] == 1.0
    assert max(map(abs, right["per_class"]["intra_fd"])) < 1e-3  # 36 digits in 64 dimensions: sqrtm's rounding
    counts = np.bincount(labels.numpy(), minlength=10)  # 35 to 37 held-out digits per class
    assert np.dot(right["per_class"]["class_acc"], counts) / counts.sum() == pytest.approx(metrics.accuracy)
    assert wrong["proxy_intra_fd"] > 10  # the right images under the wrong labels
    assert wrong["proxy_fd"] == right["proxy_fd"] and max(wrong["per_class"]["class_acc"]) < 0.1  # FD is blind to it
    garbage = metrics(noise, labels)
    assert garbage["proxy_precision"] < 0.5 and garbage["proxy_recall"] < 0.5
    # KID of a set against itself is not 0 (the cross term counts each point with itself), but small beside noise's
    assert abs(right["proxy_kid"]) < 0.02 * garbage["proxy_kid"]


def test_balanced_labels():
    assert np.bincount(proxy.balanced_labels(500).numpy()).tolist() == [50] * 10


@pytest.mark.usefixtures("cached_proxy")
def test_digits_run_end_to_end(tmp_path, metrics):
    results = custom_train.main(["--preset", "demo", "--steps", "3", "--batch-size", "8", "--final-fid-samples", "20",
                                 "--ddim-steps", "2", "--grid-per-class", "1", "--out-dir", str(tmp_path),
                                 "--method", "adanorm", "--heldout-draws", "2", "--label-draws", "1"])
    run_dir = tmp_path / "digits-tiny-adanorm-s42"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["dataset"] == "digits" and saved["proxy_samples"] == 20 and saved["fid"] is None and saved["steps"] == 3
    assert "hflip=False (protocol: True)" in saved["protocol_deviations"]
    assert "fid=proxy (protocol: clean)" in saved["protocol_deviations"]
    samples = np.load(run_dir / "samples.npz")  # saved by default for digits
    assert samples["images"].shape == (20, 16, 16, 3) and np.bincount(samples["labels"]).tolist() == [2] * 10
    # the scores are those of the saved samples: recomputed from them by the classifier
    images = torch.from_numpy(samples["images"]).permute(0, 3, 1, 2).contiguous()
    again = metrics(images, torch.from_numpy(samples["labels"]))
    assert saved["class_acc"] == again["class_acc"] and saved["proxy_fd"] == pytest.approx(again["proxy_fd"], rel=1e-9)
    assert 0 < saved["proxy_fd"] and 0 <= saved["class_acc"] <= 1
    assert results["grid"] == "grid_final.png" and (run_dir / "grid_final.png").exists()


PANEL = ("proxy_kid", "proxy_intra_fd", "proxy_precision", "proxy_recall")


@pytest.mark.usefixtures("cached_proxy")
def test_rescore_reproduces_the_runs_own_evaluation_then_scores_new_samples(tmp_path, monkeypatch, metrics):
    custom_train.main(["--preset", "demo", "--steps", "3", "--batch-size", "8", "--final-fid-samples", "20",
                       "--ddim-steps", "2", "--grid-per-class", "1", "--out-dir", str(tmp_path), "--method", "concat-film",
                       "--heldout-draws", "2", "--label-draws", "1"])
    run_dir = tmp_path / "digits-tiny-concat-film-s42"
    own = json.loads((run_dir / "results.json").read_text())
    # the reference: the checkpoint's EMA weights, sampled by hand
    net = custom_train.build_model("tiny", "concat-film", 16)
    net.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=False)["ema"])
    labels = proxy.balanced_labels(20)
    by_hand = lambda tag: metrics(custom_train.sample(
        net, labels, seed=42, tag=tag, batch_size=500, ddim_steps=2, image_size=16, amp_dtype=None,
        device=torch.device("cpu")), labels)
    assert by_hand("final")["class_acc"] == own["class_acc"]  # these are the weights the run scored
    assert by_hand("final")["proxy_fd"] == pytest.approx(own["proxy_fd"], rel=1e-9)
    final = by_hand("final")  # and the panel from the same features
    assert [final[k] for k in PANEL] == [own[k] for k in PANEL] and final["per_class"] == own["per_class"]
    record = report.rescore(run_dir, 20, tmp_path / "unused-cache")
    expected = by_hand("rescore20")
    assert record["proxy_fd"] == pytest.approx(expected["proxy_fd"], rel=1e-9)
    assert [record[k] for k in PANEL] == [expected[k] for k in PANEL] and record["per_class"] == expected["per_class"]
    assert record["class_acc"] == expected["class_acc"] and record["proxy_samples"] == 20
    assert record["heldout_loss"] == own["heldout_loss"] and record["label_acc"] == own["label_acc"]  # same draws
    assert record["weights"] == "ema" and record["step"] == 3 and record["method"] == "concat-film"
    assert record["proxy_fd"] != own["proxy_fd"]  # new noise, not the final evaluation's samples again
    assert json.loads((run_dir / "rescore-20.json").read_text()) == record
    # done once: a second call reads the file instead of sampling again
    monkeypatch.setattr(custom_train, "sample", lambda *a, **k: pytest.fail("sampled again"))
    assert report.rescore(run_dir, 20, tmp_path) == record
    report.main(["rescore", "--out-dir", str(tmp_path), "--samples", "20"])  # the CLI skips it too
    # proxy --rescored compares the rescored numbers
    report.main(["proxy", "--out-dir", str(tmp_path), "--rescored", "20", "--write-prefix", str(tmp_path / "r")])
    assert f"| concat-film | 1 | {record['proxy_fd']:.3f} (n=1) | best baseline |" in (tmp_path / "r.md").read_text()
    with pytest.raises(SystemExit):  # nothing rescored on 40 samples
        report.main(["proxy", "--out-dir", str(tmp_path), "--rescored", "40"])
    with pytest.raises(SystemExit):  # not class-balanced
        report.main(["rescore", "--out-dir", str(tmp_path), "--samples", "25"])
    (run_dir / "results.json").rename(run_dir / "results.json.away")
    with pytest.raises(custom_train.HarnessError, match=r"not a finished run with its checkpoint \(no results.json\)"):
        report.rescore(run_dir, 30, tmp_path)
    assert not (run_dir / "rescore-30.json").exists()


def fake(out_dir, method, seed, proxy_fd, class_acc):
    d = out_dir / f"digits-tiny-{method}-s{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(dict(method=method, seed=seed, scale="tiny", proxy_fd=proxy_fd,
                                                    class_acc=class_acc)))


def test_seed_aggregation_and_noise_verdicts(tmp_path):
    from scipy import stats

    base = {"concat-film": ([10.0, 11.0, 12.0], [0.70, 0.71, 0.72]),
            "cross-attn": ([9.0, 10.0, 11.0], [0.85, 0.86, 0.87]),  # the best baseline on both metrics
            "ours": ([5.0, 5.5, 6.0], [0.86, 0.84, 0.88])}          # fd clearly better; acc within noise
    for method, (fds, accs) in base.items():
        for seed, (fd, acc) in enumerate(zip(fds, accs)):
            fake(tmp_path, method, seed, fd, acc)
    rows = {r["method"]: r for r in report.proxy_comparison(report.collect(tmp_path))}
    ours = rows["ours"]
    assert ours["n"] == 3 and ours["seeds"] == [0, 1, 2]
    assert ours["proxy_fd_mean"] == pytest.approx(5.5) and ours["proxy_fd_std"] == pytest.approx(0.5)
    assert ours["proxy_fd_baseline"] == "cross-attn" and ours["proxy_fd_diff"] == pytest.approx(-4.5)
    ci = stats.ttest_ind(base["ours"][0], base["cross-attn"][0], equal_var=False).confidence_interval(0.95)
    assert (ours["proxy_fd_ci_low"], ours["proxy_fd_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert ours["proxy_fd_verdict"] == "better, beyond noise"
    assert ours["class_acc_verdict"] == "within noise"
    assert rows["cross-attn"]["proxy_fd_verdict"] == "best baseline"
    assert rows["concat-film"]["class_acc_verdict"] == "worse, beyond noise"
    paired = stats.ttest_rel(base["ours"][1], base["cross-attn"][1]).confidence_interval(0.95)
    assert (ours["class_acc_paired_ci_low"], ours["class_acc_paired_ci_high"]) == pytest.approx((paired.low, paired.high))
    assert ours["class_acc_paired_verdict"] == "within noise"
    wider = {r["method"]: r for r in report.proxy_comparison(report.collect(tmp_path), confidence=0.975)}["ours"]
    ci = stats.ttest_ind(base["ours"][0], base["cross-attn"][0], equal_var=False).confidence_interval(0.975)
    assert (wider["proxy_fd_ci_low"], wider["proxy_fd_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert wider["proxy_fd_ci_low"] < ours["proxy_fd_ci_low"]
    # Seed-to-seed luck shared by both methods: unpaired it drowns a steady +0.01, paired it does not.
    fake(tmp_path, "steady", 0, 9.0, 0.865)
    fake(tmp_path, "steady", 1, 10.0, 0.868)
    fake(tmp_path, "steady", 2, 11.0, 0.882)
    steady = {r["method"]: r for r in report.proxy_comparison(report.collect(tmp_path))}["steady"]
    assert steady["class_acc_verdict"] == "within noise"
    assert steady["class_acc_paired_verdict"] == "better, beyond noise"
    concat = rows["concat-film"]  # proxy_fd exactly 1 above cross-attn at every seed: a point, not an interval
    assert concat["proxy_fd_paired_ci_low"] == concat["proxy_fd_paired_ci_high"] == 1.0
    assert concat["proxy_fd_paired_verdict"] == "worse, beyond noise"
    fake(tmp_path, "fewer-seeds", 0, 9.0, 0.9)
    fake(tmp_path, "fewer-seeds", 1, 9.5, 0.91)
    fewer = {r["method"]: r for r in report.proxy_comparison(report.collect(tmp_path))}["fewer-seeds"]
    assert "class_acc_paired_verdict" not in fewer and "class_acc_verdict" in fewer  # seeds differ: no pairing

    report.main(["proxy", "--out-dir", str(tmp_path)])
    md = (tmp_path / "comparison.md").read_text()
    assert "| ours | 3 | 5.500 ± 0.500 | -4.500 [" in md and "better, beyond noise" in md
    assert (tmp_path / "comparison.csv").read_text().startswith("method,n,")
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    # --seeds keeps only those seeds: the pairing then holds for methods that ran more seeds
    report.main(["proxy", "--out-dir", str(tmp_path), "--seeds", "0", "1", "--write-prefix", str(tmp_path / "two")])
    md = (tmp_path / "two.md").read_text()
    assert "| ours | 2 | 5.250 ± 0.354 |" in md and "| fewer-seeds | 2 |" in md
    with pytest.raises(SystemExit):
        report.main(["proxy", "--out-dir", str(tmp_path), "--seeds", "7"])
    report.main(["proxy", "--out-dir", str(tmp_path), "--confidence", "0.975", "--write-prefix", str(tmp_path / "c")])
    assert "[Welch 97.5% CI]" in (tmp_path / "c.md").read_text()
    with pytest.raises(SystemExit):
        report.main(["proxy", "--out-dir", str(tmp_path), "--confidence", "95"])


def test_run_all_scales_proxy_mode(tmp_path, metrics):
    """--proxy --seeds 2 runs each method at two seeds with the demo preset, then writes the comparison."""
    env = dict(os.environ, OUT_DIR=str(tmp_path / "proxy"), PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "run_all_scales.sh"), "--proxy", "--seeds", "2", "concat-film", "--", "--steps", "2",
           "--batch-size", "8", "--final-fid-samples", "20", "--ddim-steps", "2", "--grid-per-class", "1",
           "--heldout-draws", "2", "--label-draws", "1", "--cache-dir", str(metrics.cache_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "proxy").iterdir() if p.is_dir()) == [
        "digits-tiny-concat-film-s42", "digits-tiny-concat-film-s43"]
    table = (tmp_path / "proxy/comparison.md").read_text()
    assert "| concat-film | 2 |" in table and "heldout_loss ↓" in table and "label_acc ↑" in table
    assert all(f"{m} {arrow} (mean ± std)" in table for m, arrow in (("proxy_kid", "↓"), ("proxy_intra_fd", "↓"),
                                                                     ("proxy_precision", "↑"), ("proxy_recall", "↑")))
    bad = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--seeds", "zero"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds needs a positive integer" in bad.stderr


def test_rescore_refuses_weights_of_other_code(tmp_path):
    """A method kept in a file, run, then edited: its weights belong to the old code, and rescoring them with
    the new one is refused (before any sampling)."""
    idea = tmp_path / "idea.py"
    idea.write_text("from conditioning import NoConditioner as ClassConditioner\n\n\n"
                    "def prepare_conditioning(time_emb, class_emb):\n    return time_emb + class_emb\n")
    results = custom_train.main(["--preset", "demo", "--steps", "2", "--batch-size", "8", "--fid", "off",
                                 "--ddim-steps", "2", "--grid-per-class", "1", "--heldout-draws", "0",
                                 "--method", str(idea), "--out-dir", str(tmp_path / "runs")])
    run_dir = tmp_path / "runs" / f"digits-tiny-idea-{results['method_sha256'][:8]}-s42"
    assert run_dir.is_dir()
    idea.write_text(idea.read_text().replace("time_emb + class_emb", "time_emb + 2 * class_emb"))
    with pytest.raises(custom_train.HarnessError, match=r"was made by other code for method '.*idea.py' \(sha256 "
                                                        r"[0-9a-f]{8}, today [0-9a-f]{8}\)"):
        report.rescore(run_dir, 20, tmp_path / "cache")


@pytest.mark.usefixtures("cached_proxy")
def test_evaluate_reproduces_a_digits_runs_final_numbers_then_scores_more(tmp_path, metrics, capsys):
    """custom_train.py --evaluate RUN_DIR: the run's own options and "final" samples give its final numbers
    exactly (panel, per-class and held-out metrics included), in a new dated file beside results.json; more
    samples go to another file, and neither results.json nor the first file is touched."""
    custom_train.main(["--preset", "demo", "--steps", "3", "--batch-size", "8", "--final-fid-samples", "20",
                       "--ddim-steps", "2", "--grid-per-class", "1", "--out-dir", str(tmp_path), "--method", "adanorm",
                       "--heldout-draws", "2", "--label-draws", "1"])
    run_dir = tmp_path / "digits-tiny-adanorm-s42"
    own, results_bytes = json.loads((run_dir / "results.json").read_text()), (run_dir / "results.json").read_bytes()
    assert own["config"]["panel"] is False  # (the CIFAR-10 panel's option: off for digits, as before it existed)
    assert (run_dir / "per_class.csv").read_text().splitlines()[0] == "class,name,intra_fd,class_acc"
    assert (run_dir / "per_class.png").read_bytes()[:4] == b"\x89PNG"

    again = custom_train.main(["--evaluate", str(run_dir)])
    (first,) = run_dir.glob("evaluation-*[0-9].json")
    written = json.loads(first.read_text())
    for key in ("proxy_fd", "class_acc", "proxy_samples", *PANEL, "per_class", "heldout_loss", "label_acc"):
        assert written[key] == own[key] == json.loads(json.dumps(again))[key], key
    assert written["weights"] == own["evals"][-1]["weights"] == "ema" and written["step"] == 3 and written["options"]["final_fid_samples"] == 20
    assert (run_dir / first.name.replace(".json", "-per_class.csv")).is_file()
    assert (run_dir / first.name.replace(".json", "-grid.png")).is_file()
    assert str(first) in capsys.readouterr().out

    more = custom_train.main(["--evaluate", str(run_dir), "--final-fid-samples", "40", "--heldout-draws", "0"])
    assert more["proxy_samples"] == 40 and "heldout_loss" not in more and more["proxy_fd"] != own["proxy_fd"]
    assert len(list(run_dir.glob("evaluation-*.json"))) == 2 and json.loads(first.read_text()) == written
    assert (run_dir / "results.json").read_bytes() == results_bytes


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1"], "--lr cannot be changed"),
    (["--steps", "9", "--method", "cross-attn"], "--method, --steps cannot be changed"),
])
def test_evaluate_refuses_training_options_and_missing_checkpoints(tmp_path, argv, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(custom_train.HarnessError, match="not a finished run directory with its checkpoint"):
        custom_train.main(["--evaluate", str(run_dir)])
    for name in ("config.json", "results.json"):
        (run_dir / name).write_text("{}")
    (run_dir / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(custom_train.HarnessError, match=message):
        custom_train.main(["--evaluate", str(run_dir), *argv])


def test_evaluate_dry_run_says_what_it_would_do(tmp_path, capsys):
    custom_train.main(["--preset", "demo", "--steps", "2", "--batch-size", "8", "--final-fid-samples", "0",
                       "--ddim-steps", "2", "--grid-per-class", "1", "--out-dir", str(tmp_path), "--fid", "off",
                       "--heldout-draws", "0", "--method", "adanorm"])
    run_dir = tmp_path / "digits-tiny-adanorm-s42"
    capsys.readouterr()
    custom_train.main(["--evaluate", str(run_dir), "--final-fid-samples", "30", "--dry-run"])
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}\nwould: score its checkpoint again into a new evaluation-DATE.json" in out
    assert '"final_fid_samples": 30' in out and not list(run_dir.glob("evaluation-*"))
