"""The CIFAR-10 panel: its references made through clean-fid's own pipeline and cached, refused when made
another way; the classifier recipe; the panel in a run's results (FID unchanged); --evaluate on CIFAR-10."""
import json

import numpy as np
import pytest
import torch

import custom_train
import evaluation
from conftest import STAND_IN_RECIPE, StandInInception, write_tiny_cifar10
from test_train import run


def test_reference_features_are_clean_fids_own_from_png_files(tmp_path):
    """The train set's features equal what clean-fid computes from PNG files of the same pixels (its
    folder pipeline, with which its reference statistics were made); the per-class statistics are the
    same whether the features are extracted in one batch or in batches of 7."""
    from cleanfid.fid import get_files_features
    from PIL import Image

    images, labels = write_tiny_cifar10(tmp_path / "data")
    extractor = StandInInception()
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"{i:03d}.png"))
        Image.fromarray(image.transpose(1, 2, 0)).save(files[-1])
    theirs = get_files_features(files, extractor, num_workers=0, batch_size=32, device=torch.device("cpu"),
                                mode="clean", verbose=False)
    one_go = evaluation.make_reference(images, labels, extractor, torch.device("cpu"), batch_size=len(images))
    np.testing.assert_allclose(one_go["features"], theirs, rtol=1e-5, atol=1e-6)
    batched = evaluation.make_reference(images, labels, extractor, torch.device("cpu"), batch_size=7)
    np.testing.assert_allclose(batched["mu"], one_go["mu"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(batched["sigma"], one_go["sigma"], rtol=1e-6, atol=1e-9)
    for c in range(10):  # each class's statistics are clean-fid's fit (np.mean, np.cov) of that class's features
        mine = theirs[labels == c]
        if len(mine) >= 2:
            np.testing.assert_allclose(one_go["mu"][c], mine.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(one_go["sigma"][c], np.cov(mine, rowvar=False), rtol=1e-4, atol=1e-7)
        else:
            assert np.isnan(one_go["mu"][c]).all()


def test_cached_references_are_refused_when_made_another_way(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "CLASSIFIER_FLOOR", 0.0)  # 100 look-alike images: a weak classifier
    images, labels = write_tiny_cifar10(tmp_path / "data")
    test = custom_train.load_cifar10(tmp_path / "data", "test")[:2]
    folder, extractor, cpu = tmp_path / "assets", StandInInception(), torch.device("cpu")
    ref = evaluation.load_or_make_reference(folder, images, labels, extractor, cpu)
    again = evaluation.load_or_make_reference(folder, images, labels, extractor, cpu)  # loaded, the same
    np.testing.assert_array_equal(ref["sigma"], again["sigma"])
    other = images.copy()
    other[0, 0, 0, 0] ^= 1  # one pixel of other data
    with pytest.raises(evaluation.AssetError, match="was made another way.*delete it to remake it") as e:
        evaluation.load_or_make_reference(folder, other, labels, extractor, cpu)
    assert "\n" not in str(e.value)
    with torch.no_grad():
        extractor.conv.bias.add_(0.01)  # another network
    with pytest.raises(evaluation.AssetError, match="was made another way"):
        evaluation.load_or_make_reference(folder, images, labels, extractor, cpu)

    evaluation.load_or_train_classifier(folder, (images, labels), test, cpu, STAND_IN_RECIPE)
    with pytest.raises(evaluation.AssetError, match="cifar10_classifier.pt was made another way"):
        evaluation.load_or_train_classifier(folder, (images, labels), test, cpu, dict(STAND_IN_RECIPE, epochs=5))


def test_the_classifier_recipe_learns_the_look_alike_data_in_seconds(tmp_path):
    """The recipe (narrower and shorter, as for the stand-in data; same code path) reaches high test
    accuracy on 1,000 look-alike images, and the cached model predicts as the trained one."""
    write_tiny_cifar10(tmp_path / "data", per_batch=200)
    train = custom_train.load_cifar10(tmp_path / "data", "train")[:2]
    test = custom_train.load_cifar10(tmp_path / "data", "test")[:2]
    recipe = dict(STAND_IN_RECIPE, batch_size=25)
    model, accuracy = evaluation.train_classifier(train, test, "cpu", recipe)
    assert accuracy >= 0.95
    cached, recorded = evaluation.load_or_train_classifier(tmp_path, train, test, "cpu", recipe)
    assert recorded == accuracy
    images = torch.from_numpy(test[0])
    assert torch.equal(cached.predict(images), model.predict(images))


def test_a_cifar10_run_reports_the_panel_with_fid_unchanged_and_evaluate_reproduces_it(tmp_path, cifar_dir, stand_in_fid,
                                                                                      monkeypatch):
    real_radii = evaluation._kth_neighbour_radii
    images, _, _ = custom_train.load_cifar10(cifar_dir)
    stand_in_fid.write_stats(images)
    common = ("--steps", 4, "--fid-samples", 0, "--final-fid-samples", 30, "--heldout-draws", 1, "--label-draws", 1)
    run(tmp_path, cifar_dir, *common, "--save-samples")
    run_dir = tmp_path / "runs" / "tiny-cross-attn-s42"
    saved = json.loads((run_dir / "results.json").read_text())
    for key in ("kid", "precision", "recall", "class_acc", "classifier_accuracy"):
        assert isinstance(saved[key], float), key
    assert 0 <= saved["precision"] <= 1 and 0 <= saved["class_acc"] <= 1 and saved["fid_samples"] == 30
    per_class = saved["per_class"]
    assert set(per_class) == {"intra_fid", "class_acc"} and len(per_class["class_acc"]) == 10
    assert saved["intra_fid"] == (None if None in per_class["intra_fid"] else pytest.approx(np.mean(per_class["intra_fid"])))
    rows = (run_dir / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,name,intra_fid,class_acc" and rows[1].startswith("0,airplane,") and len(rows) == 11

    # the numbers are those of the saved samples, scored by the cached assets
    samples = np.load(run_dir / "samples.npz")
    images = torch.from_numpy(samples["images"]).permute(0, 3, 1, 2).contiguous()
    scorer = evaluation.CleanFID(torch.device("cpu"), panel=custom_train.panel_data(cifar_dir, None))
    by_hand = json.loads(json.dumps(custom_train.finite_or_none(scorer(images, torch.from_numpy(samples["labels"])))))
    assert {k: saved[k] for k in by_hand} == by_hand
    # a second evaluation by the same scorer reuses the train features' manifold (their radii are not redone)
    made = scorer.reference_manifold
    radii = []
    monkeypatch.setattr(evaluation, "_kth_neighbour_radii", lambda x, k, chunk: radii.append(len(x)) or real_radii(x, k, chunk))
    second = scorer(images[:20], torch.from_numpy(samples["labels"][:20]))
    assert scorer.reference_manifold is made and radii == [20]  # the samples' alone
    fresh = evaluation.CleanFID(torch.device("cpu"), panel=custom_train.panel_data(cifar_dir, None))
    assert fresh(images[:20], torch.from_numpy(samples["labels"][:20])) == second
    fid_alone = evaluation.CleanFID(torch.device("cpu"))(images, torch.from_numpy(samples["labels"]))
    assert fid_alone == dict(fid=saved["fid"], fid_samples=30)  # the FID is the protocol's, panel or not

    # --evaluate: the run's own options and "final" samples give its final numbers exactly
    again = custom_train.main(["--evaluate", str(run_dir), "--data-dir", str(cifar_dir)])
    for key in ("fid", "kid", "intra_fid", "precision", "recall", "class_acc", "per_class", "heldout_loss", "label_acc"):
        assert json.loads(json.dumps(custom_train.finite_or_none(again)))[key] == saved[key], key
    more = custom_train.main(["--evaluate", str(run_dir), "--data-dir", str(cifar_dir), "--final-fid-samples", "40",
                              "--no-panel"])
    assert more["fid_samples"] == 40 and "kid" not in more and more["fid"] != saved["fid"]


def test_the_fingerprint_reads_every_tensor_of_a_network_even_scalar_buffers():
    """A BatchNorm keeps a 0-d counter (num_batches_tracked); the fingerprint reads it, and any change of a
    weight or buffer changes the fingerprint."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    first = evaluation.fingerprint(net)
    assert evaluation.fingerprint(net) == first
    net[1].num_batches_tracked += 1
    second = evaluation.fingerprint(net)
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-6
    assert len({first, second, evaluation.fingerprint(net)}) == 3
