"""`benchmarks.attention_heads`: a `--quick` run trains, shrinks, times and resumes.

No accuracy and no timing is asserted: the quick run's numbers mean nothing.
"""

import json
import os

import pytest

from benchmarks import attention_heads, structured_methods


def test_quick_run_writes_a_row_per_seed_and_resumes(tmp_path, shared_data, capsys,
                                                     monkeypatch):
    rows = attention_heads.main(["--quick", "--data-dir", shared_data, "--out", str(tmp_path)])
    path = tmp_path / "attention_heads" / "seed_0.json"
    row = json.loads(path.read_text())
    assert rows == [row] and row["limit"] == 128 and row["epochs"] == 1
    assert row["dense"]["macs"] > 0 and row["ours"]["macs"] <= row["dense"]["macs"]
    assert len(row["ours"]["heads"]) == 4 and all(1 <= h <= 4 for h in row["ours"]["heads"])
    assert len(row["ours"]["mlp_units"]) == 4
    assert all(1 <= u <= 128 for u in row["ours"]["mlp_units"])
    assert row["litert_f32_ms"]["dense"] > 0 and row["litert_f32_ms"]["ours"] > 0
    assert "python -m benchmarks.attention_heads --quick" in row["command"]
    assert "| seed | dense acc |" in capsys.readouterr().out
    assert "vit" not in structured_methods.NETS  # the structured benchmark's nets stay its own

    def trained_again(*args):
        pytest.fail("seed 0 was trained again")

    monkeypatch.setattr(attention_heads, "run_seed", trained_again)
    again = attention_heads.main(["--quick", "--data-dir", shared_data, "--out", str(tmp_path)])
    assert again == [row] and "done before, kept" in capsys.readouterr().out
    assert os.listdir(tmp_path / "attention_heads") == ["seed_0.json"]


def test_keras_hub_vit_opens_and_loses_heads_and_mlp_units(tmp_path, shared_data):
    """keras-hub's ViTBackbone: channel gates open its blocks (`keras_stg.inline`), so
    its heads and MLP units are removed like the Functional transformer's."""
    (row,) = attention_heads.main(["--quick", "--net", "keras_hub_vit", "--data-dir",
                                   shared_data, "--out", str(tmp_path)])
    assert (tmp_path / "attention_heads" / "keras_hub_vit" / "seed_0.json").exists()
    assert row["net"] == "keras_hub_vit" and row["ours"]["macs"] <= row["dense"]["macs"]
    # The shrunk model is the opened one: its attentions and MLPs are its own layers.
    assert len(row["ours"]["heads"]) == 4 and all(1 <= h <= 4 for h in row["ours"]["heads"])
    assert len(row["ours"]["mlp_units"]) == 4


def test_the_table_pairs_each_seed_with_its_dense_model():
    def row(seed, dense, ours, ms):
        return {"seed": seed, "dense": {"accuracy": dense, "macs": 100},
                "ours": {"accuracy": ours, "macs": 50, "heads": [4, 3], "mlp_units": [64, 60]},
                "litert_f32_ms": {"dense": 1.0, "ours": ms}}

    text = attention_heads.table([row(0, 0.90, 0.89, 0.6), row(1, 0.88, 0.88, 0.5)])
    assert "| 0 | 90.00 | 89.00 | -1.00 | 50.0% | 4/3 | 64/60 | 0.60x |" in text
    assert "paired over 2 seed(s): -0.50 ± 0.71 points at 50.0%-50.0%" in text
    assert "LiteRT f32 0.50-0.60x dense" in text
