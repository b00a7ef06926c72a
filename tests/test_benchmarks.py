"""The benchmark suite: edge-popup baseline invariants and a `--quick` smoke run.

No accuracy and no timing is asserted: the quick run's numbers mean nothing.
"""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_stg
from benchmarks import run as bench
from benchmarks.suite import common, part_cost, part_frontier, report, tasks
from benchmarks.edge_popup import (EdgePopupModel, init_like_ours, kept_count, sgd_cosine,
                                   topk_mask)
from keras_stg.experiments import config as stg_config
from keras_stg.experiments import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _edge_popup(density, model=None):
    model = init_like_ours(model or models.lenet_300_100((28, 28, 1)), 1 - density, seed=0)
    return EdgePopupModel(model, density=density, weight_decay=1e-4, seed=0)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("density", [0.5, 0.3, 0.1, 0.05, 0.02])
def test_topk_mask_keeps_exact_fraction_per_layer(density):
    ep = _edge_popup(density)
    for score, mask in zip(ep.scores, ep.masks()):
        n = math.prod(score.shape)
        assert mask.shape == tuple(score.shape)
        assert int(mask.sum()) == kept_count(n, density) == round(density * n)
        # The kept weights are exactly those with the largest |score|.
        a = np.abs(np.asarray(score.value))
        assert a[mask].min() >= a[~mask].max()
    assert ep.sparsity() == pytest.approx(1 - density, abs=1e-5)


def test_topk_mask_on_conv_kernel_and_edges():
    s = tf.random.normal((3, 3, 8, 16), seed=1)
    for density in (1.0, 0.999, 0.5, 1e-6):
        m = topk_mask(s, density).numpy()
        assert m.shape == (3, 3, 8, 16)
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert int(m.sum()) == kept_count(s.shape.num_elements(), density)


@pytest.mark.parametrize("density", [0.5, 0.1])
@pytest.mark.parametrize("scale_fan", [False, True])
def test_same_frozen_weights_as_ours(density, scale_fan):
    model = init_like_ours(models.lenet_300_100((28, 28, 1)), 1 - density, seed=0,
                           scale_fan=scale_fan)
    ep = EdgePopupModel(model, density=density, weight_decay=1e-4, seed=0)
    gated = keras_stg.wrap(models.lenet_300_100((28, 28, 1)), mode="slt",
                           target_sparsity=1 - density, seed=0,
                           init_density="auto" if scale_fan else None)
    for t_ep, t_ours in zip(ep.targets, gated.targets):
        np.testing.assert_array_equal(np.asarray(t_ep.variable), np.asarray(t_ours.variable))
    # Scale-fan multiplies the signed constant by 1/sqrt(density).
    plain = init_like_ours(models.lenet_300_100((28, 28, 1)), 1 - density, seed=0)
    ratio = np.abs(np.asarray(model.get_layer("fc1").kernel)).max() / np.abs(
        np.asarray(plain.get_layer("fc1").kernel)).max()
    assert ratio == pytest.approx(1 / math.sqrt(density) if scale_fan else 1.0, rel=1e-5)


def test_benchmark_takes_each_task_config():
    """Ours runs with the task config's batch size and scale-fan; --batch-size overrides."""
    setup = tasks.Setup(bench.parse_args([]))
    lenet = stg_config.load(os.path.join(REPO, "configs", "lenet_300_100_mnist_slt.yaml"))
    joint = stg_config.load(os.path.join(REPO, "configs",
                                               "lenet_300_100_mnist_joint.yaml"))
    assert setup.batch_for("lenet_mnist") == lenet.batch_size
    assert setup.batch_for("lenet_mnist", "joint") == joint.batch_size
    assert setup.scale_fan("lenet_mnist") is bool(lenet.scale_fan)
    conv4_joint = stg_config.load(os.path.join(REPO, "configs", "conv4_fashion_mnist_joint.yaml"))
    assert setup.batch_for("conv4_fashion", "joint") == conv4_joint.batch_size
    assert setup.config("conv4_fashion", "joint").finetune == joint.finetune == 0.7
    assert tasks.Setup(bench.parse_args(["--batch-size", "32"])).batch_for(
        "lenet_mnist", "joint") == 32


def test_training_moves_scores_not_weights():
    ep = _edge_popup(0.1)
    before = [np.array(v) for v in ep.base_model.weights]
    scores_before = [np.array(s) for s in ep.scores]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 64)
    ep.compile(optimizer=sgd_cosine(0.1, 4), loss=_loss())
    ep.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert [v.path for v in ep.trainable_weights] == [s.path for s in ep.scores]
    for b, v in zip(before, ep.base_model.weights):
        np.testing.assert_array_equal(b, np.asarray(v))
    assert any(not np.array_equal(b, np.asarray(s)) for b, s in zip(scores_before, ep.scores))
    for score, mask in zip(ep.scores, ep.masks()):
        assert int(mask.sum()) == kept_count(math.prod(score.shape), 0.1)


def test_straight_through_gradient_reaches_all_scores():
    ep = _edge_popup(0.1)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((32, 28, 28, 1)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, 32))
    with tf.GradientTape(persistent=True) as tape:
        mapping = ep.masked_values()
        with keras.StatelessScope(state_mapping=mapping):
            logits = ep.base_model(x)
        loss = tf.reduce_mean(_loss()(y, logits))
    grads = tape.gradient(loss, [s.value for s in ep.scores])
    eff_grads = tape.gradient(loss, [value for _, value in mapping])
    for score, target, g, g_eff, mask in zip(ep.scores, ep.targets, grads, eff_grads,
                                             ep.masks()):
        assert g is not None
        g = g.numpy()
        # Straight-through: dL/ds = dL/d(W*m) * W * sign(s), also where the mask is 0.
        expected = g_eff.numpy() * np.asarray(target.variable) * np.sign(np.asarray(score))
        np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-9)
        assert np.count_nonzero(g[~mask]) > 0.5 * (~mask).sum()


def test_edge_popup_rejects_bad_density():
    with pytest.raises(ValueError, match="`density` must be in"):
        EdgePopupModel(models.lenet_300_100((28, 28, 1)), density=0.0)


def test_replace_section_keeps_hand_written_text(tmp_path):
    path = tmp_path / "RESULTS.md"
    report.replace_section(str(path), "first")
    assert path.read_text() == f"{common.BEGIN}\nfirst\n{common.END}\n"
    path.write_text("# Title\n\nhand\n\n" + path.read_text() + "\n## After\nkept\n")
    report.replace_section(str(path), "second\nrun")
    text = path.read_text()
    assert text.startswith("# Title\n\nhand\n\n")
    assert f"{common.BEGIN}\nsecond\nrun\n{common.END}" in text
    assert "first" not in text and text.endswith("## After\nkept\n")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_table_says_why_tfmot_was_skipped():
    results = {"frontier": {}, "cost": {}, "export": {"ok": False, "reason": "export stage "
                                                      "not available (import failed)"},
               "joint": {"lenet_mnist": {"title": "LeNet", "epochs": 1, "skipped": None,
                                         "ours": [{"target": 0.9, "accuracy": 0.5,
                                                   "sparsity": 0.9, "wall_time_s": 1.0}],
                                         "tfmot": {"ok": False, "reason": "not importable"}}}}
    table = report.markdown_table(report.table_rows(results))
    assert "skipped: not importable" in table
    assert "export stage not available" in table


def _quick(tmp_path, shared_data, *only):
    """Runs `python -m benchmarks.run --quick --only ONLY` into `tmp_path`; returns its stdout."""
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    if not results.exists():
        results.write_text(f"# Hand-written\n\nkeep me\n\n{common.BEGIN}\nold\n{common.END}\n\ntail\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_USE_LEGACY_KERAS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", *only,
         "--results", str(results), "--out", str(out), "--data-dir", shared_data],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _table(stdout):
    header = "| " + " | ".join(report.HEADER) + " |"
    assert header in stdout
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert all(line.count("|") == len(report.HEADER) + 1 for line in table)
    return table


def _check_pngs(out, generated, expected):
    import matplotlib.image

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert set(expected) <= set(pngs), pngs
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert name in generated


@pytest.mark.e2e
def test_quick_frontier_and_export_end_to_end(tmp_path, shared_data):
    """The frontier (ours, edge-popup, the claim's probe) and the export of its 90% ticket."""
    stdout = _quick(tmp_path, shared_data, "frontier", "export")
    table = _table(stdout)
    for part in ("frontier", "export"):
        assert any(line.startswith(f"| {part} |") for line in table), part
    for method in ("ours (slt)", "edge-popup"):
        assert f"| {method} |" in stdout, method
    assert "| Conv-4 / CIFAR-10 |" in stdout  # run, or skipped with its reason

    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    for task in ("lenet_mnist", "conv4_fashion"):
        front = data["frontier"][task]
        assert [r["target"] for r in front["ours"] if not r.get("probe")] == [0.5, 0.9]
        # The claim's probe: a quarter of the weights at edge-popup's best k.
        best = max(front["edge_popup"], key=lambda r: r["accuracy"])
        probes = [r["target"] for r in front["ours"] if r.get("probe")]
        assert probes == [pytest.approx(1 - (1 - best["target"]) / 4)]
        assert [r["sparsity"] for r in front["edge_popup"]] == pytest.approx([0.5, 0.9], abs=1e-4)
        slt_config = stg_config.load(os.path.join(REPO, "configs", common.TASK_CONFIGS[task][0]
                                                  + ".yaml"))
        assert front["batch"] == slt_config.batch_size
        assert front["scale_fan"] is bool(slt_config.scale_fan)
    export = data["export"]
    assert export["ok"], export
    assert export["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert export["sizes"]["sparse"]["bytes"] < export["sizes"]["dense"]["bytes"]

    # Generated section replaced between the markers, the rest kept.
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Hand-written\n\nkeep me\n\n") and text.endswith("\n\ntail\n")
    assert text.count(common.BEGIN) == 1 and text.count(common.END) == 1
    assert "\nold\n" not in text
    generated = text[text.index(common.BEGIN):text.index(common.END)]
    assert "| " + " | ".join(report.HEADER) + " |" in generated and "Quick run" in generated
    _check_pngs(out, generated, {"frontier_conv4_fashion.png", "frontier_lenet_mnist.png"})


@pytest.mark.e2e
@pytest.mark.parametrize("task", ["lenet_mnist", "conv4_fashion"])
def test_quick_joint_end_to_end_keeps_the_other_parts(tmp_path, shared_data, task):
    """Joint training against tfmot (one task per run, to keep each test short), run into a
    folder that holds the other parts' results: they stay in results.json and the table."""
    out = tmp_path / "out"
    out.mkdir()
    kept = {
        "frontier": {"lenet_mnist": {
            "title": "LeNet-300-100 / MNIST", "epochs": 1, "limit": 1024, "batch": 64,
            "scale_fan": True, "command": "python -m benchmarks.run --quick", "run": "earlier",
            "skipped": None, "ep_settings": "SGD",
            "ours": [{"target": 0.5, "accuracy": 0.5, "sparsity": 0.5, "wall_time_s": 1.0}],
            "edge_popup": [{"target": 0.5, "accuracy": 0.6, "sparsity": 0.5,
                            "wall_time_s": 1.0}]}},
        "cost": {"lenet_mnist": {"title": "LeNet-300-100 / MNIST", "batch": 128, "steps": 5,
                                 "repeats": 2, "plain_ms": 20.0, "gated_ms": 21.0,
                                 "ep_k50_ms": 55.0, "ep_k10_ms": 34.0}},
        "export": {"ok": True, "model": "LeNet-300-100 / MNIST, slt", "sparsity": 0.9,
                   "sizes": {v: {"bytes": b, "gzip_bytes": b // 2} for v, b in
                             (("dense", 1000), ("sparse", 200), ("int8", 300))}},
        "meta": {"quick": True, "commands": {"frontier": "python -m benchmarks.run --quick"}},
    }
    (out / "results.json").write_text(json.dumps(kept))
    stdout = _quick(tmp_path, shared_data, "joint", "--tasks", task)
    table = _table(stdout)
    for part in ("frontier", "joint", "cost", "export"):
        assert any(line.startswith(f"| {part} |") for line in table), part
    for method in ("ours (slt)", "edge-popup", "ours (joint)", "tfmot magnitude",
                   "gated step (slt)"):
        assert f"| {method} |" in stdout, method

    data = json.loads((out / "results.json").read_text())
    for part in ("frontier", "cost", "export"):
        assert data[part] == kept[part], part
    assert list(data["joint"]) == [task]
    tfmot = data["joint"][task]["tfmot"]  # ran in its own process (the test extras)
    assert tfmot["ok"], tfmot
    assert [r["sparsity_target"] for r in tfmot["results"]] == [0.9, 0.95]
    assert all(0 <= r["accuracy"] <= 1 for r in tfmot["results"])
    assert [r["target"] for r in data["joint"][task]["ours"]] == [0.9, 0.95]
    text = (tmp_path / "RESULTS.md").read_text()
    generated = text[text.index(common.BEGIN):text.index(common.END)]
    _check_pngs(out, generated, {"joint_vs_tfmot.png"})


def test_cost_part_times_plain_gated_and_edge_popup_steps(tmp_path):
    """`cost` in this process on synthetic batches: every step time is measured."""
    setup = tasks.Setup(bench.parse_args(["--quick", "--out", str(tmp_path)]))
    results = {"cost": {}}
    saves = []
    part_cost.part_cost(setup, ["lenet_mnist", "conv4_fashion"], results, lambda: saves.append(1))
    assert list(results["cost"]) == ["lenet_mnist"] and saves  # --quick: LeNet only
    row = results["cost"]["lenet_mnist"]
    assert row["steps"] == 5 and row["repeats"] == 2
    for key in ("plain_ms", "gated_ms", "ep_k50_ms", "ep_k10_ms"):
        assert 0 < row[key] < 60_000, key


def test_frontier_with_one_method_keeps_the_other_methods_rows(monkeypatch, tmp_path):
    """`--methods ours` re-runs ours against edge-popup's rows of the same setting."""
    setup = tasks.Setup(bench.parse_args(["--out", str(tmp_path)]))
    monkeypatch.setattr(setup, "datasets", lambda task, part="slt": (None, None, 1))
    monkeypatch.setattr(part_frontier, "task_available", lambda setup, task: None)
    calls = []

    def fake_ours(setup, task, sparsity, mode, train, test, **kwargs):
        calls.append(sparsity)
        return {"accuracy": 0.5, "sparsity": sparsity, "wall_time_s": 1.0}, None

    monkeypatch.setattr(part_frontier, "train_ours", fake_ours)
    results = {"frontier": {}}
    part_frontier.part_frontier(setup, ["conv4_fashion"], [0.5, 0.9], results, lambda: None,
                        methods=("ours",))
    assert results["frontier"]["conv4_fashion"]["edge_popup"] == []  # nothing to keep
    entry = results["frontier"]["conv4_fashion"]
    entry["edge_popup"] = [{"target": 0.5, "accuracy": 0.9}, {"target": 0.9, "accuracy": 0.8}]
    entry["ours"].append({"target": 0.875, "accuracy": 0.1, "probe": True})
    calls.clear()
    part_frontier.part_frontier(setup, ["conv4_fashion"], [0.5, 0.9], results, lambda: None,
                        methods=("ours",))
    entry = results["frontier"]["conv4_fashion"]
    assert [r["accuracy"] for r in entry["edge_popup"]] == [0.9, 0.8]
    # Ours ran afresh at both sparsities, then at the probe for edge-popup's best k (0.5).
    assert calls == [0.5, 0.9, 0.875]
    assert [r["target"] for r in entry["ours"]] == [0.5, 0.9, 0.875]
    # Another setting (here the batch size) does not keep rows.
    other = tasks.Setup(bench.parse_args(["--out", str(tmp_path), "--batch-size", "7"]))
    monkeypatch.setattr(other, "datasets", lambda task, part="slt": (None, None, 1))
    part_frontier.part_frontier(other, ["conv4_fashion"], [0.5], results, lambda: None,
                        methods=("ours",))
    assert results["frontier"]["conv4_fashion"]["edge_popup"] == []


def test_limit_shortens_training_only_and_is_part_of_the_setting(monkeypatch, tmp_path):
    """`--limit N` trains on N examples, tests on the whole split, and is named in
    the rows; rows of a run with another limit are not kept."""
    setup = tasks.Setup(bench.parse_args(["--out", str(tmp_path), "--limit", "3000"]))
    assert setup.limits("conv4_fashion") == (3000, None)
    monkeypatch.setattr(setup, "datasets", lambda task, part="slt": (None, None, 1))
    monkeypatch.setattr(part_frontier, "task_available", lambda setup, task: None)
    monkeypatch.setattr(part_frontier, "train_ours", lambda *a, **k: (
        {"accuracy": 0.5, "sparsity": a[2], "wall_time_s": 1.0}, None))
    results = {"frontier": {}, "joint": {}, "cost": {}}
    part_frontier.part_frontier(setup, ["conv4_fashion"], [0.9], results, lambda: None,
                        methods=("ours",))
    entry = results["frontier"]["conv4_fashion"]
    assert entry["limit"] == 3000
    assert "first 3000 training examples" in entry["title"]
    assert "first 3000 training examples" in report.table_rows(results)[0][1]
    entry["edge_popup"] = [{"target": 0.9, "accuracy": 0.8, "sparsity": 0.9,
                            "wall_time_s": 1.0}]
    full = tasks.Setup(bench.parse_args(["--out", str(tmp_path)]))
    monkeypatch.setattr(full, "datasets", lambda task, part="slt": (None, None, 1))
    part_frontier.part_frontier(full, ["conv4_fashion"], [0.9], results, lambda: None,
                        methods=("ours",))
    assert results["frontier"]["conv4_fashion"]["edge_popup"] == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--limit", "0"])


def test_section_names_the_command_of_each_tasks_rows():
    """Rows of two tasks made by two runs of one part list both commands."""
    results = {"meta": {"commands": {"joint": "python -m benchmarks.run B",
                                     "cost": "python -m benchmarks.run C"},
                        "runs": {"joint": "t2", "cost": "t3"}},
               "frontier": {},
               "joint": {"a": {"command": "python -m benchmarks.run A", "run": "t1"},
                         "b": {"command": "python -m benchmarks.run B", "run": "t2"},
                         "c": {}},  # an older entry: the part's latest command
               "cost": {}}
    assert report._commands(results) == ["python -m benchmarks.run A    # t1",
                                        "python -m benchmarks.run B    # t2",
                                        "python -m benchmarks.run C    # t3"]


def test_config_steps_times_real_and_synthetic_data(shared_data, tmp_path, capsys):
    from benchmarks import config_steps

    lenet = os.path.join(REPO, "configs", "lenet_300_100_mnist_slt.yaml")
    row = config_steps.time_config(lenet, shared_data, steps=2, batch_size=32)
    assert row["data"] == "real" and row["timed_steps"] == 2 and row["batch_size"] == 32
    assert row["gated_weights"] == 266_200 and row["epoch_steps"] == math.ceil(60000 / 32)
    assert row["step_s"] > 0 and row["epoch_estimate_s"] == row["step_s"] * row["epoch_steps"]
    # CIFAR-10 is absent from the shared data: a clear error naming the way out...
    cifar = os.path.join(REPO, "configs", "conv4_cifar10_slt.yaml")
    with pytest.raises(SystemExit, match="(?s)conv4_cifar10_slt: No cifar10 files.*--synthetic"):
        config_steps.time_config(cifar, str(tmp_path), steps=1, batch_size=4)
    # ... or random images of the right shape, labelled as such in the rows.
    out = tmp_path / "rows.jsonl"
    rows = config_steps.main([cifar, "--data-dir", str(tmp_path), "--steps", "1",
                              "--batch-size", "4", "--synthetic", "--json", str(out)])
    assert rows[0]["data"] == "synthetic" and rows[0]["epoch_steps"] == 12500
    assert json.loads(out.read_text())["config"] == "conv4_cifar10_slt"
    assert "| `conv4_cifar10_slt` | synthetic | 4 |" in capsys.readouterr().out


def test_tickets_benchmark_settings_and_table():
    """`benchmarks.tickets` (its --quick run takes about a minute): what it trains and
    the table it prints."""
    from benchmarks import tickets

    quick = tickets.settings(tickets.parse_args(["--quick"]))
    assert [name for name, _, _ in quick] == [
        "LeNet-300-100, 90%", "LeNet-300-100, 95%", "LeNet-300-100, 98%", "Conv-4, 90%"]
    assert quick[1][2] == ["target_sparsity=0.95", "epochs=1", "limit=4096"]
    full = tickets.settings(tickets.parse_args(["--epochs", "7", "--conv-limit", "500"]))
    assert full[0][2] == ["target_sparsity=0.9", "epochs=7"]
    assert full[3][2] == ["target_sparsity=0.9", "epochs=4", "limit=500"]
    for _, config_file, overrides in full:
        stg_config.load(config_file, overrides)  # the files exist and take the overrides
    row = {"ticket": "LeNet-300-100, 90%", "sparsity": 0.9002, "bytes": 16_700,
           "bound": 15_650.4, "header": 1_020, "masks": 15_660, "sparse_tflite": 166_492,
           "gzip_sparse_tflite": 41_926, "dense_tflite": 1_066_420, "save_s": 0.1234,
           "load_s": 0.0876, "accuracy": 0.9779, "same_as_stripped": True}
    lines = tickets.table([row, {**row, "same_as_stripped": False}]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert lines[2] == (
        "| LeNet-300-100, 90% | 90.02% | 16,700 | 15,650 | 1,020 | 15,660 | 1.0006 | 1.0671 "
        "| 166,492 | 41,926 | 1,066,420 | 10.0x | 0.123 | 0.088 | 97.79% |")
    assert lines[3].endswith("97.79% (differs from the stripped model!) |")


def test_channel_tiles_times_every_width_in_every_runtime(capsys):
    from benchmarks import channel_tiles

    out = channel_tiles.main(["--widths", "8", "16", "24", "32", "--rounds", "1", "--runs", "2"])
    assert set(out) == {3, 1}
    for times in out.values():
        assert set(times) == {"LiteRT f32", "LiteRT int8", "ORT f32", "ORT int8"}
        assert all(len(column) == 4 and min(column) > 0 for column in times.values())
    text = capsys.readouterr().out
    assert "| 3x3 conv, output channels | LiteRT f32 (us) |" in text
    assert text.count("| tile read |") == 2
    # The tile read from a column is the library's reading of those times.
    staircase = {"LiteRT f32": [1.0, 1.0, 2.0, 2.0]}
    assert channel_tiles.table(3, [8, 16, 24, 32], staircase).endswith("| tile read | 16 |")
