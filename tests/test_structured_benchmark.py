"""`benchmarks.structured`: the baselines' pruning rules and a `--quick` run of every part.

No accuracy and no timing is asserted: the quick run's numbers mean nothing.
"""

import json
import os
import re

import numpy as np
import pytest

from benchmarks import structured
from benchmarks import structured_methods as sm
from keras_stg.experiments import models
from tests import helpers


class _Group:
    def __init__(self, size):
        self.size = size


def test_uniform_rule_cuts_each_group_alike_global_rule_cuts_the_lowest_scores():
    scores = [(_Group(4), np.array([0.4, 0.1, 0.3, 0.2])),
              (_Group(2), np.array([0.05, 0.9])),
              (_Group(3), np.array([0.01, 0.02, 0.03]))]
    uniform = sm._closed(scores, 0.5, uniform=True)
    assert [sorted(c.tolist()) for c in uniform] == [[1, 3], [0], [0]]
    closed = sm._closed(scores, 5 / 9, uniform=False)  # the 5 lowest of 9 scores
    # 0.01, 0.02, 0.03 (the whole third group, so its best channel stays), 0.05, 0.1.
    assert [sorted(c.tolist()) for c in closed] == [[1], [0], [0, 1]]


def test_baselines_prune_whole_channel_groups_to_the_macs_target():
    assert sm.macs(sm.fresh("resnet20", 0))[1] == 31_021_952  # ResNet-20 at 28x28x1
    model = models.resnet20((12, 12, 1), width=8)  # the same graph, smaller
    dense_params, dense_macs = sm.macs(model)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if hasattr(layer, "gamma"):
            layer.gamma.assign(rng.uniform(0.1, 1.0, layer.gamma.shape).astype("float32"))
    for scores, uniform in ((sm.l1_scores, True), (sm.gamma_scores, False)):
        small = sm.prune_to_macs(model, scores, 0.5, uniform, steps=5)
        params, macs = sm.macs(small)
        assert 1 - macs / dense_macs == pytest.approx(0.5, abs=0.06) and params < dense_params
        # A residual group loses the same channels in every producer it couples.
        names = ("stem_conv", "stage1_block1_conv2", "stage1_block3_conv2")
        assert len({small.get_layer(n).filters for n in names}) == 1
    assert sm.macs(model) == (dense_params, dense_macs)  # the model itself is untouched


def test_uniform_control_cuts_every_group_by_about_one_share():
    import keras

    model = models.resnet20((12, 12, 1), width=8)
    dense_macs = sm.macs(model)[1]
    small = sm.prune_to_macs(model, sm.random_scores(0), 0.5, uniform=True, steps=6)
    assert 1 - sm.macs(small)[1] / dense_macs == pytest.approx(0.5, abs=0.06)
    shares = [small.get_layer(layer.name).filters / layer.filters for layer in model.layers
              if isinstance(layer, keras.layers.Conv2D)]
    assert max(shares) - min(shares) <= 1 / 8 + 1e-9  # int(share * width) on 8/16/32 widths
    assert all(0.5 < s < 0.9 for s in shares)


QUICK_METHODS = ["dense", "ours", "ours-tile", "l1", "slimming", "uniform"]
QUICK = ["--quick", "--nets", "resnet20", "--methods"] + QUICK_METHODS


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    """One output folder for the quick run's parts (each test runs one, resumably)."""
    return str(tmp_path_factory.mktemp("structured"))


@pytest.mark.e2e
@pytest.mark.parametrize("method", QUICK_METHODS)
def test_quick_train_part_saves_each_method(method, quick_out, shared_data, tmp_path,
                                            monkeypatch):
    if method == "ours-tile":  # the runtime's tile, as if measured before: 4 channels
        helpers.seed_channel_tile(tmp_path, monkeypatch, 4)
    structured.main(QUICK[:-len(QUICK_METHODS)] + [method, "--only", "train", "--data-dir",
                                                   shared_data, "--out", quick_out])
    folder = os.path.join(quick_out, "structured", "resnet20")
    key = method if method == "dense" else f"{method}_0.50"
    row = json.load(open(os.path.join(folder, f"{key}.json")))
    assert row["method"] == method and os.path.exists(os.path.join(folder, f"{key}.keras"))
    assert "python -m benchmarks.structured --quick" in row["command"]
    if method == "dense":
        assert row["macs_removed"] == 0.0
        assert all(layer.momentum == sm.BN_MOMENTUM for layer in
                   sm.fresh("resnet20", 0).layers if hasattr(layer, "momentum"))
    else:
        # Channels go in blocks of 8: ResNet-20's 16/32/64-channel groups reach few levels
        # (the uniform control's counts are not rounded to blocks, so it comes closer).
        tolerance = 0.1 if method == "uniform" else 0.25
        assert row["macs_removed"] == pytest.approx(0.5, abs=tolerance)
    if method.startswith("ours"):
        assert row["gated_sparsity"] == pytest.approx(0.5, abs=0.02)
    if method == "ours-tile":
        import keras

        assert row["channel_multiple"] == 4
        small = keras.models.load_model(os.path.join(folder, f"{key}.keras"), compile=False)
        widths = [layer.filters for layer in small.layers
                  if isinstance(layer, keras.layers.Conv2D)]
        assert all(w % 4 == 0 for w in widths) and any(w % 8 for w in widths), widths
        assert structured._label(row) == "ours (channel, flops, runtime tile 4)"


@pytest.mark.e2e
def test_quick_latency_and_report_parts(quick_out, shared_data, tmp_path, capsys):
    results = str(tmp_path / "R.md")
    # The train part keeps what the tests above trained (and trains what they did not).
    tables = structured.main(QUICK + ["--only", "train", "latency", "report", "--data-dir",
                                      shared_data, "--out", quick_out, "--results", results])
    assert capsys.readouterr().out.count("done before, kept") == len(QUICK_METHODS)
    rows = tables["resnet20"]
    assert [r["method"] for r in rows] == QUICK_METHODS
    for r in rows:
        for runtime in structured.RUNTIMES:
            assert r[f"{runtime}_ms"] > 0
        assert r["edgetpu_problems"] == []  # the shrunk int8 files pass the readiness check
        assert 0 <= r["int8_accuracy"] <= 1 and r["tflite_bytes"] > 0
    assert rows[0]["litert_f32_ratio"] == 1.0
    text = open(results).read()
    assert structured.BEGIN in text and "| L1 filter | 0.50 |" in text and "| ready |" in text
    assert os.path.exists(os.path.join(quick_out, "structured.png"))


@pytest.mark.e2e
def test_quick_unstructured_part(tmp_path, shared_data):
    structured.main(["--quick", "--only", "unstructured", "--nets", "mobilenet_v2",
                     "--data-dir", shared_data, "--out", str(tmp_path)])
    rows = json.load(open(tmp_path / "structured" / "unstructured.json"))["rows"]
    assert {r["granularity"] for r in rows} == {"dense", "weight", "block4", "block16"}
    assert {r["runtime"] for r in rows} == {"default (XNNPACK)", "builtin kernels, no delegates"}
    for r in rows:
        assert r["ms"] > 0 and (r["granularity"] == "dense" or 0.85 < r["sparsity"] < 0.95)


@pytest.mark.e2e
def test_channel_alignment_benchmark_shrinks_every_group_alike(capsys):
    from benchmarks import channel_alignment

    rows, medians = channel_alignment.main(["--widths", "16", "12", "--rounds", "1",
                                            "--runs", "2"])
    assert [r["width"] for r in rows] == [16, 12] and rows[1]["macs"] < rows[0]["macs"]
    assert len(medians) == 4 and all(m > 0 for m in medians)
    assert "| 12/24/48 |" in capsys.readouterr().out


def test_validation_takes_the_last_training_images(shared_data, capsys):
    from keras_stg.experiments import data as data_lib

    x, y, xv, yv = sm.data("resnet20", shared_data, 100, 50, validation=True)
    full_x, full_y = data_lib.load("fashion_mnist", "train", shared_data)
    expected = data_lib.normalize(full_x[-50:], "fashion_mnist").reshape(-1, 28, 28, 1)
    np.testing.assert_array_equal(xv, expected)
    np.testing.assert_array_equal(yv, full_y[-50:])
    assert len(x) == 100 and len(full_x) > 150
    with pytest.raises(ValueError, match="overlap the first 59990.*lower --limit"):
        sm.data("resnet20", shared_data, 59990, 50, validation=True)
    with pytest.raises(SystemExit):
        structured.parse_args(["--validation"])
    assert "--validation needs its own --out folder" in capsys.readouterr().err


def test_an_unreachable_target_is_recorded_and_reported(tmp_path, shared_data):
    # ResNet-20 keeps at least 8 channels of every group: 99% of its MACs cannot go.
    results = str(tmp_path / "R.md")
    structured.main(["--quick", "--nets", "resnet20", "--methods", "ours", "--targets", "0.99",
                     "--only", "train", "report", "--data-dir", shared_data,
                     "--out", str(tmp_path), "--results", results])
    row = json.load(open(tmp_path / "structured" / "resnet20" / "ours_0.99.json"))
    assert "cannot be reached" in row["unreachable"] and 0.5 < row["reachable"] < 0.99
    assert not os.path.exists(tmp_path / "structured" / "resnet20" / "ours_0.99.keras")
    assert re.search(r"\| ours \(channel, flops\) \| 0\.99 \| target unreachable: at most "
                     r"\d+\.\d% removable", open(results).read())


@pytest.mark.parametrize("rank", ["taylor", "taylor_cost", "random"])
def test_taylor_gates_train_dense_then_keep_the_best_scored_blocks(rank):
    import keras

    import keras_stg

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 10, 64)
    model = models.resnet20((12, 12, 1), width=8, blocks=1)
    gated = keras_stg.wrapping.draw_init(sm._taylor_model_class()(
        model, mode="joint", granularity="channel", cost="flops", target_sparsity=0.4,
        finetune=0.5, seed=0, init_mu=0.5, sigma=0.1, channel_multiple=4))
    gated.rank = rank
    sm.compile_model(gated, 4)
    gated.fit(x, y, batch_size=32, epochs=1, verbose=0)  # two steps of dense gate phase
    assert not gated._mask_frozen and gated.sparsity() == 0.0  # every channel open
    assert all(np.all(g.mu.numpy() == 0.5) for g in gated.gates)  # the locations stay
    sums = [t.numpy().copy() for t in gated._taylor]
    assert all(np.all(s > 0) for s in sums)  # every channel's gradient was summed
    first = gated.scores()
    keras.utils.set_random_seed(1)
    gated.fit(x, y, batch_size=32, epochs=2, verbose=0)  # freezes after 2 of 4 steps
    assert gated._mask_frozen and gated.sparsity() == pytest.approx(0.4, abs=0.1)
    scores = gated.scores()  # the sums stop growing at the freeze
    assert all(np.all(t.numpy() > s) for t, s in zip(gated._taylor, sums))
    if rank == "taylor_cost":
        costs = gated.marginal_costs()
        assert len(set(costs)) > 1 and all(c > 0 for c in costs)
    for gate, score in zip(gated.gates, scores):
        kept = gate.mu.numpy() > 0
        # Each group keeps its best-scored channels, in blocks of 4 (at least one).
        assert kept.sum() >= 4 and kept.sum() % 4 == 0
        if not kept.all():
            assert score[kept].min() >= score[~kept].max()
    if rank == "random":
        assert all(np.array_equal(a, b) for a, b in zip(first, scores))


def _seed_row(folder, method, target, accuracy, macs_removed, **setting):
    row = {"net": "resnet20", "method": method, "target": target, "accuracy": accuracy,
           "macs_removed": macs_removed, "limit": 100, "test_limit": 50, "epochs": 2,
           "evaluated_on": "test", "channel_multiple": 8, "command": "cmd", "date": "d",
           "load": 1.0, **setting}
    os.makedirs(folder, exist_ok=True)
    name = method if target is None else f"{method}_{target:.2f}"
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(row, f)


def test_seeds_part_pairs_every_seed_with_its_own_dense_model(tmp_path, capsys):
    top = tmp_path / "structured" / "resnet20"
    for seed, dense, ours in ((0, 0.88, 0.87), (1, 0.89, 0.885), (2, 0.87, 0.86)):
        folder = str(top if seed == 0 else top / f"seed_{seed}")
        _seed_row(folder, "dense", None, dense, 0.0)
        _seed_row(folder, "ours", 0.5, ours, 0.5 + seed / 100)
    _seed_row(str(top), "l1", 0.5, 0.80, 0.4)  # one seed: not in the seeds table
    _seed_row(str(top / "seed_3"), "ours", 0.5, 0.99, 0.5, limit=999)  # another setting
    results = tmp_path / "R.md"
    results.write_text("before\n")
    summaries = structured.main(["--only", "seeds", "--nets", "resnet20", "--out",
                                 str(tmp_path), "--results", str(results)])
    entries = {e["key"]: e for e in summaries["resnet20"]}
    assert set(entries) == {"dense", "ours_0.50"}
    ours = entries["ours_0.50"]
    assert ours["seeds"] == [0, 1, 2] and ours["paired_seeds"] == 3
    assert ours["accuracy"][0] == pytest.approx((87.0 + 88.5 + 86.0) / 3)
    assert ours["paired"][0] == pytest.approx(-2.5 / 3)
    assert ours["paired"][1] == pytest.approx(np.std([-1.0, -0.5, -1.0], ddof=1))
    assert ours["macs_removed"] == pytest.approx(51.0)
    text = results.read_text()
    assert text.startswith("before") and structured.SEEDS_BEGIN in text
    assert "| ours (channel, flops) | 0.50 | 51.0% | 87.00 / 88.50 / 86.00 (seeds 0, 1, 2) | " \
           "87.17 ± 1.26 | -0.83 ± 0.29 (3) |" in text
    assert os.path.exists(tmp_path / "structured_seeds.png")
    # Run again: the block is replaced, not appended.
    structured.main(["--only", "seeds", "--nets", "resnet20", "--out", str(tmp_path),
                     "--results", str(results)])
    assert results.read_text().count(structured.SEEDS_BEGIN) == 1


@pytest.mark.e2e
def test_another_seed_trains_into_its_own_folder_without_models(tmp_path, shared_data, capsys):
    command = ["--quick", "--nets", "resnet20", "--methods", "dense", "--seed", "1", "--only",
               "train", "--data-dir", shared_data, "--out", str(tmp_path)]
    structured.main(command)
    folder = tmp_path / "structured" / "resnet20"
    row = json.load(open(folder / "seed_1" / "dense.json"))
    assert row["seed"] == 1 and not os.path.exists(folder / "seed_1" / "dense.keras")
    assert not os.path.exists(folder / "dense.json")  # seed 0's place stays free
    structured.main(command)  # resumes: the row is kept, nothing trains
    assert "dense: done before, kept" in capsys.readouterr().out
