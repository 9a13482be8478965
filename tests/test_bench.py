"""bench.py: the FLOP count behind MFU, and the side-by-side table (a tiny CPU run, not a timing test)."""
import pytest
import torch

import bench
import custom_train


def test_flop_count_matches_the_published_cost_of_small():
    """The issue's figure: 9.1 GFLOP per image forward+backward at small scale."""
    torch.manual_seed(0)
    model = custom_train.build_model("small", "concat-film")
    assert bench.flops_per_image(model, 32, torch.device("cpu")) / 1e9 == pytest.approx(9.1, rel=0.05)


def test_table_has_every_variant_side_by_side(tmp_path):
    table = bench.main(["--scales", "tiny", "--steps", "1", "--warmup", "1", "--batch-size", "8",
                        "--out", str(tmp_path / "bench.md")])
    assert (tmp_path / "bench.md").read_text() == table
    training = table.split("## FID resize")[0]
    rows = [line for line in training.splitlines() if line.startswith("| ") and "x |" in line]
    labels = [r.split(" | ")[0][2:] for r in rows]
    assert labels[0].startswith("protocol loop") and labels[1].startswith("default")
    assert "+ fused AdamW" in labels and "+ channels_last" in labels and labels[-1].startswith("best combination")
    assert rows[0].split(" | ")[3] == "1.00x"  # ratios are against the protocol loop
    assert "DDIM sampling, 50 steps" in table and "clean-fid PIL, per image, CPU" in table
