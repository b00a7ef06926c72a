"""The `seeds` part of `benchmarks.run` (issue 18): resumable multi-seed rows, their
summary, the iso-accuracy comparison, the variants, and edge-popup's exact top-k.

Training is replaced by fakes where the logic under test is the bookkeeping; no
accuracy is asserted.
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

from benchmarks import run as bench
from benchmarks.edge_popup import kept_count, topk_mask
from benchmarks.suite import part_seeds, tasks, variants
from keras_stg.experiments import models


@pytest.mark.parametrize("density", [0.5, 0.3, 0.1, 0.04])
def test_topk_mask_is_exact_with_ties(density):
    """Many equal scores: the kept count is exact and no pruned score beats a kept one
    (the bisection path at 0.5/0.3/0.1, the top_k path at 0.04; `topk_mask` bisects only
    layers of >= BISECT_MIN weights)."""
    rng = np.random.default_rng(0)
    s = rng.integers(-20, 21, size=(512, 301)).astype("float32")  # 41 values, many ties
    m = topk_mask(tf.constant(s), density).numpy().astype(bool)
    assert int(m.sum()) == kept_count(s.size, density)
    a = np.abs(s)
    assert a[m].min() >= a[~m].max()


def test_topk_mask_bisection_matches_sort():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((64, 3, 3, 256)).astype("float32")  # bisection path
    for density in (0.5, 0.2, 0.9, 0.97):
        m = topk_mask(tf.constant(s), density).numpy().astype(bool)
        keep = kept_count(s.size, density)
        order = np.argsort(-np.abs(s).ravel(), kind="stable")
        expected = np.zeros(s.size, bool)
        expected[order[:keep]] = True
        np.testing.assert_array_equal(m.ravel(), expected)


def _pt(sparsity, acc, **kw):
    return dict({"sparsity": sparsity, "acc": acc, "target": sparsity}, **kw)


def test_iso_sparsity_interpolates_in_log_kept_share():
    pts = [_pt(0.5, 0.98), _pt(0.9, 0.97), _pt(0.99, 0.90)]
    s, censored = part_seeds.iso_sparsity(pts, 0.97)
    assert censored == "" and s == pytest.approx(0.9)
    s, _ = part_seeds.iso_sparsity(pts, 0.935)  # halfway between 10% and 1% kept, in log
    assert 1 - s == pytest.approx(math.sqrt(0.1 * 0.01))
    assert part_seeds.iso_sparsity(pts, 0.99) == (None, None)  # never reached
    assert part_seeds.iso_sparsity(pts, 0.85) == (0.99, ">=")  # holds at the sparsest point
    # A dip and a recovery: the last crossing from above to below counts.
    dip = [_pt(0.5, 0.96), _pt(0.7, 0.94), _pt(0.9, 0.96), _pt(0.95, 0.90)]
    s, _ = part_seeds.iso_sparsity(dip, 0.95)
    assert 0.9 < s < 0.95


def _row(method, target, seed, acc, setting=None, **kw):
    return dict({"method": method, "target": target, "seed": seed, "accuracy": acc,
                 "sparsity": target, "wall_time_s": 10.0, "epochs": 20,
                 "setting": setting or {"epochs": 20}}, **kw)


def test_summarize_means_stds_latest_setting_and_best_epoch():
    rows = [_row("ours", 0.9, s, a) for s, a in ((0, 0.97), (1, 0.98), (2, 0.99))]
    rows.append(_row("ours", 0.9, 2, 0.96))  # a re-run of seed 2 replaces the first
    rows.append(_row("edge_popup", 0.9, 0, 0.5, setting={"epochs": 5}))  # an older setting
    rows += [_row("edge_popup", 0.9, s, 0.95, epoch_accuracy=[0.97, 0.95]) for s in (0, 1)]
    summary = part_seeds.summarize(rows)
    p = summary["ours"]["points"][0]
    assert p["n"] == 3 and p["seeds"] == [0, 1, 2]
    assert p["acc"] == pytest.approx(np.mean([0.97, 0.98, 0.96]))
    assert p["acc_std"] == pytest.approx(np.std([0.97, 0.98, 0.96], ddof=1))
    q = summary["edge_popup"]["points"][0]
    assert q["n"] == 2 and q["acc"] == pytest.approx(0.95) and q["best"] == pytest.approx(0.97)


def test_rows_file_skips_a_cut_line_and_claims_respect_live_processes(tmp_path):
    path = str(tmp_path / "seeds" / "t.jsonl")
    part_seeds.append_row(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2, "cut sho')  # a run killed mid-write
    assert part_seeds.read_rows(path) == [{"a": 1}]
    claim = part_seeds._claim(path, "ours", 0.9, 0)
    assert claim and open(claim).read() == str(os.getpid())
    assert part_seeds._claim(path, "ours", 0.9, 0) is None  # held by a live process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    with open(claim, "w") as f:
        f.write(dead)
    assert part_seeds._claim(path, "ours", 0.9, 0) == claim  # a dead run's claim is taken


def test_the_default_method_at_edge_popups_time_is_timed_against_its_own_rows(monkeypatch,
                                                                               tmp_path):
    setup = tasks.Setup(bench.parse_args(["--out", str(tmp_path), "--only", "seeds"]))
    setup.command, setup.run_info = "cmd", "now"
    monkeypatch.setattr(setup, "datasets", lambda task, part="slt": (None, None, 1))
    monkeypatch.setattr(part_seeds, "task_available", lambda setup, task: None)
    times = {"ours": 40.0, "ours_psigma": 8.0, "ours_ptime": 20.0}
    calls = []

    def fake_ours(setup, task, sparsity, mode, train, test, epochs=None, per_epoch=False,
                  wrap=None, **kwargs):
        calls.append(epochs)
        return {"accuracy": 0.9, "sparsity": sparsity, "epochs": epochs or 20,
                "wall_time_s": times[method_now[0]], "epoch_accuracy": [0.9]}, None

    def fake_ep(setup, task, sparsity, train, test, steps, per_epoch=False):
        return {"accuracy": 0.8, "sparsity": sparsity, "wall_time_s": 20.0, "epochs": 20,
                "epoch_accuracy": [0.8]}

    method_now = [None]
    real_run = part_seeds._run_point

    def run_point(setup, task, method, target, epochs):
        method_now[0] = method
        return real_run(setup, task, method, target, epochs)

    monkeypatch.setattr(part_seeds, "train_ours", fake_ours)
    monkeypatch.setattr(part_seeds, "train_edge_popup", fake_ep)
    monkeypatch.setattr(part_seeds, "_run_point", run_point)
    out = str(tmp_path)
    part_seeds.part_seeds(setup, ["lenet_mnist"], [0.9], [0], ["ours", "edge_popup"], out)
    part_seeds.part_seeds(setup, ["lenet_mnist"], [0.9], [0], ["ours_ptime"], out)
    assert calls == [None]  # waits for the ours_psigma row, not the absolute controller's
    part_seeds.part_seeds(setup, ["lenet_mnist"], [0.9], [0], ["ours_psigma", "ours_ptime"],
                          out)
    assert calls == [None, None, 50]  # 20 epochs * 20 s / 8 s
    rows = part_seeds.read_rows(part_seeds.rows_path(out, "lenet_mnist"))
    ptime = [r for r in rows if r["method"] == "ours_ptime"]
    assert len(ptime) == 1 and ptime[0]["setting"]["polish"] == 0.25
    assert ptime[0]["setting"]["sigma"] == 0.25
    assert "50 ep" in "\n".join(part_seeds.report(out, ["lenet_mnist"]))


def test_part_resumes_point_by_point_and_times_ours_to_edge_popup(monkeypatch, tmp_path):
    setup = tasks.Setup(bench.parse_args(["--out", str(tmp_path), "--only", "seeds"]))
    setup.command, setup.run_info = "cmd", "now"
    monkeypatch.setattr(setup, "datasets", lambda task, part="slt": (None, None, 1))
    monkeypatch.setattr(part_seeds, "task_available", lambda setup, task: None)
    calls = []

    def fake_ours(setup, task, sparsity, mode, train, test, epochs=None, per_epoch=False,
                  **kwargs):
        assert per_epoch
        calls.append(("ours", sparsity, setup.seed, epochs, sorted(kwargs)))
        return {"accuracy": 0.9, "sparsity": sparsity, "wall_time_s": 10.0,
                "epochs": epochs or 20, "epoch_accuracy": [0.9]}, None

    def fake_ep(setup, task, sparsity, train, test, steps, per_epoch=False):
        assert per_epoch
        calls.append(("edge_popup", sparsity, setup.seed))
        return {"accuracy": 0.8, "sparsity": sparsity, "wall_time_s": 25.0, "epochs": 20,
                "epoch_accuracy": [0.85, 0.8]}

    monkeypatch.setattr(part_seeds, "train_ours", fake_ours)
    monkeypatch.setattr(part_seeds, "train_edge_popup", fake_ep)
    out = str(tmp_path)
    part_seeds.part_seeds(setup, ["lenet_mnist"], [0.9], [0, 1], ["ours_time"], out)
    assert calls == []  # ours_time waits for the rows it is timed against
    part_seeds.part_seeds(setup, ["lenet_mnist"], [0.9, 0.5], [0, 1],
                          ["ours", "edge_popup"], out)
    assert [c[:3] for c in calls] == [("ours", 0.9, 0), ("edge_popup", 0.9, 0),
                                      ("ours", 0.9, 1), ("edge_popup", 0.9, 1),
                                      ("ours", 0.5, 0), ("edge_popup", 0.5, 0),
                                      ("ours", 0.5, 1), ("edge_popup", 0.5, 1)]
    calls.clear()
    part_seeds.part_seeds(setup, ["lenet_mnist"], [0.9, 0.5], [0, 1],
                          ["ours", "edge_popup", "ours_time"], out)
    # Done points are not run again; ours_time gets 20 * 25 s / 10 s = 50 epochs.
    assert calls == [("ours", 0.9, 0, 50, ["wrap"]), ("ours", 0.9, 1, 50, ["wrap"]),
                     ("ours", 0.5, 0, 50, ["wrap"]), ("ours", 0.5, 1, 50, ["wrap"])]
    rows = part_seeds.read_rows(part_seeds.rows_path(out, "lenet_mnist"))
    assert len(rows) == 12 and all(r["command"] == "cmd" for r in rows)
    assert not os.listdir(part_seeds.rows_path(out, "lenet_mnist") + ".claims")
    # Another setting (the epochs) runs every point afresh.
    calls.clear()
    other = tasks.Setup(bench.parse_args(["--out", out, "--epochs", "3"]))
    monkeypatch.setattr(other, "datasets", lambda task, part="slt": (None, None, 1))
    part_seeds.part_seeds(other, ["lenet_mnist"], [0.9], [0], ["ours"], out)
    assert len(calls) == 1
    # The report: edge-popup ahead at both sparsities, best epoch listed.
    text = "\n".join(part_seeds.report(out, ["lenet_mnist"]))
    assert "ours >= edge-popup" in text and "**met**" in text
    assert "85.00 ± 0.00 (n=2)" in text  # edge-popup's best epoch
    assert "50 ep" in text
    assert "kept ratio" not in text  # two sparsities are no frontier to read levels from
    # Ours' rows are now of the 3-epoch run: the heading says the budgets differ.
    assert ("(3 epochs, batch 64, scale-fan; other methods: edge-popup 20 epochs, batch 64, "
            "scale-fan" in text)
    paths = part_seeds.plot(out, ["lenet_mnist"])
    assert paths and open(paths[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_targets_say_where_ours_is_behind_and_the_kept_ratio():
    rows = []
    for seed in (0, 1, 2):
        for t, ours, ep in ((0.5, 0.980, 0.982), (0.9, 0.978, 0.975), (0.99, 0.95, 0.60)):
            rows.append(_row("ours", t, seed, ours))
            rows.append(_row("edge_popup", t, seed, ep))
    lines = part_seeds._targets("lenet_mnist", part_seeds.summarize(rows))
    text = "\n".join(lines)
    assert ("**not met** (behind at 50% (-0.20; paired by seed -0.20 ± 0.00, ahead on 0 of 3))"
            in text)
    # The paired figures come from the seeds both methods ran: ours ahead on seed 0 only.
    spread = [r for r in rows if r["target"] != 0.5] + [
        _row(m, 0.5, seed, acc) for seed, pair in enumerate(((0.981, 0.980), (0.979, 0.982),
                                                             (0.983, 0.984), (0.901, None)))
        for m, acc in zip(("ours", "edge_popup"), pair) if acc is not None]
    paired = "\n".join(part_seeds._targets("lenet_mnist", part_seeds.summarize(spread)))
    assert "behind at 50% (-2.10; paired by seed -0.10 ± 0.20, ahead on 1 of 3)" in paired
    more = rows + [_row("ours", 0.9, 0, 0.99, sparsity=0.8)]  # ahead, but at 80% sparsity
    more += [_row("ours", 0.5, s, 0.99) for s in (0, 1, 2)]
    other = "\n".join(part_seeds._targets("lenet_mnist", part_seeds.summarize(more)))
    assert ("**not met** (ahead but short of the target sparsity at 90% (ours at 86.67%))"
            in other)
    assert ">= 98% at 90% (seed mean): **not met**" in text
    # At 97%: edge-popup reaches it up to ~91%, ours up to ~94.6%: not twice fewer weights.
    assert "keeps at most half the weights edge-popup keeps: **not met** at 97%" in text
    # Two sparsities are no frontier: the half-the-weights target is not judged on them.
    two = [r for r in rows if r["target"] != 0.99]
    short = "\n".join(part_seeds._targets("lenet_mnist", part_seeds.summarize(two)))
    assert "edge-popup keeps: not judged (2 sparsities measured, 3 needed)" in short


def test_erk_variant_presses_small_layers_less_and_holds_the_global_target():
    model = models.lenet_300_100((28, 28, 1))
    gated = variants.wrap_for("ours_erk")(model, mode="slt", target_sparsity=0.9, seed=0)
    assert isinstance(gated, variants.ErkGatedModel)
    scales = gated._erk
    # 1 / Erdos-Renyi density: fan_in * fan_out / (fan_in + fan_out), mean 1 over weights.
    raw = [784 * 300 / 1084, 300 * 100 / 400, 100 * 10 / 110]
    assert scales == pytest.approx([r / (sum(n * r for n, r in zip(gated._n_weights, raw))
                                         / sum(gated._n_weights)) for r in raw])
    assert scales[0] > scales[1] > scales[2]
    gated.before_step()
    weighted = sum(float(g.expected_l0()) * s for g, s in zip(gated.gates, scales))
    assert float(gated.extra_loss()) == pytest.approx(
        float(gated.lam.numpy()) * weighted / sum(gated._n_weights), rel=1e-5)
    assert gated.target_sparsity == 0.9  # one global controller, as the library's


def test_layerwise_model_has_one_controller_per_layer():
    model = models.lenet_300_100((28, 28, 1))
    gated = variants.wrap_layerwise(model, mode="slt", target_sparsity=0.5, seed=0)
    states = gated._layer_states
    assert len(states) == len(gated.gates) == 3
    # With every lambda equal, the penalty equals the library's global one.
    gated.before_step()
    expected_global = float(gated._expected_density()) * float(gated.lam.numpy())
    assert float(gated.extra_loss()) == pytest.approx(expected_global, rel=1e-5)
    # A layer sparser than the target gets a smaller lambda, a denser one a larger.
    gated.gates[0].mu.assign(np.full(gated.gates[0].mu.shape, -1.0, "float32"))  # all closed
    gated.gates[1].mu.assign(np.full(gated.gates[1].mu.shape, 1.0, "float32"))  # all open
    gated.after_step(1.0)
    lams = [float(s.lam.numpy()) for s in states]
    assert lams[0] < 1.0 < lams[1]


def test_seeds_part_quick_run_end_to_end(tmp_path, shared_data):
    """Two seeds, tiny data, no `--methods`: the library's current defaults and edge-popup
    run; rows, section and plot are written."""
    out = tmp_path / "out"
    results = tmp_path / "R.md"
    results.write_text("# hand-written\n")
    bench.main(["--quick", "--only", "seeds", "--tasks", "lenet_mnist", "--seeds", "0", "1",
                "--sparsities", "0.5", "--data-dir", shared_data, "--out", str(out),
                "--results", str(results)])
    rows = part_seeds.read_rows(part_seeds.rows_path(str(out), "lenet_mnist"))
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("edge_popup", 0), ("edge_popup", 1), (variants.DEFAULT_METHOD, 0),
        (variants.DEFAULT_METHOD, 1)]
    assert all(len(r["epoch_accuracy"]) == 1 for r in rows)
    text = results.read_text()
    assert text.startswith("# hand-written") and "<!-- benchmarks.seeds:begin -->" in text
    assert "(n=2)" in text and (out / "seeds_lenet_mnist.png").exists()
    assert not (out / "results.json").exists()  # the seeds part keeps to its own files


def test_conv4_width_factor_and_the_half_width_task():
    half = models.conv4((28, 28, 1), width_factor=0.5)
    assert [half.get_layer(f"conv{i}").filters for i in (1, 2, 3, 4)] == [32, 32, 64, 64]
    assert half.get_layer("fc1").units == 256 and half.name == "conv4_x0.5"
    assert models.conv4((28, 28, 1)).name == "conv4"
    setup = tasks.Setup(bench.parse_args(["--only", "seeds", "--tasks", "conv4h_fashion"]))
    built = setup.build("conv4h_fashion")
    assert built.get_layer("conv4").filters == 64 and built.input_shape[1:] == (28, 28, 1)
    # A plain run keeps to the original tasks and parts.
    args = bench.parse_args([])
    assert "conv4h_fashion" not in args.tasks and "seeds" not in args.only


def test_scale_fan_flag_overrides_the_config_for_both_methods(monkeypatch):
    setup = tasks.Setup(bench.parse_args(["--scale-fan", "on"]))
    assert setup.scale_fan("conv4_fashion") is True  # its config says no
    assert part_seeds.setting(setup, "conv4_fashion", "ours")["scale_fan"] is True
    assert tasks.Setup(bench.parse_args([])).scale_fan("conv4_fashion") is False
    assert tasks.Setup(bench.parse_args(["--scale-fan", "off"])).scale_fan("lenet_mnist") is False
    seen = {}

    def fake_wrap(model, **options):
        seen.update(options)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        tasks.train_ours(setup, "conv4_fashion", 0.9, "slt", None, None, wrap=fake_wrap)
    assert seen["init_density"] == "auto"


def test_each_method_pins_its_controller_error_whatever_the_library_default(monkeypatch):
    """A row keeps its meaning when the library default changes: `ours` and its variants
    run the absolute controller, `ours_ratio` the log-ratio one, and the setting says so
    only where it is not the absolute one (the rows from before it existed); the same
    for the controller's rate and the gates' sigma."""
    from keras_stg import penalty as penalty_lib

    setup = tasks.Setup(bench.parse_args(["--only", "seeds"]))
    model = models.lenet_300_100((28, 28, 1))
    for default in penalty_lib.ERRORS:
        monkeypatch.setattr(penalty_lib, "DEFAULT_ERROR", default)
        for method, error in variants.CONTROLLER_ERRORS.items():
            gated = variants.wrap_for(method)(model, mode="slt", target_sparsity=0.9, seed=0)
            assert gated.penalty.error == error, (method, default)
            rate = variants.CONTROLLER_RATES[method]
            assert gated.penalty.rate == rate
            s = part_seeds.setting(setup, "lenet_mnist", method)
            assert ("controller_error" in s) == (error != "absolute")
            assert s.get("controller_rate") == (None if rate == 0.01 else rate)
            sigma = variants.SIGMAS[method]
            assert {float(g.sigma) for g in gated.gates} == {sigma}, method
            assert s.get("sigma") == (None if sigma == 0.5 else sigma)
            assert gated.config.polish == variants.POLISHES[method], method
            polish = variants.POLISHES[method]
            assert s.get("polish") == (polish or None)
    assert isinstance(variants.wrap_for("ours_layer")(model, target_sparsity=0.9, seed=0),
                      variants.LayerwiseGatedModel)
    assert variants.CONTROLLER_ERRORS[variants.DEFAULT_METHOD] == penalty_lib.DEFAULT_ERROR
    assert variants.CONTROLLER_RATES[variants.DEFAULT_METHOD] == penalty_lib.DEFAULT_RATE
    # The default method is what the library's "auto" polish does in slt mode.
    from keras_stg import config as config_lib

    assert variants.POLISHES[variants.DEFAULT_METHOD] == config_lib.AUTO_POLISH
    assert variants.SIGMAS[variants.DEFAULT_METHOD] == config_lib.AUTO_SIGMA
    assert set(variants.CONTROLLER_ERRORS) == set(part_seeds.METHODS) - {"edge_popup"}


def test_training_order_is_a_function_of_the_seed_alone(shared_data):
    """A run sees its seed's data order whatever the process ran before (tf.data mixes
    TensorFlow's global seed into a shuffle's order; the previous run set it)."""
    import tensorflow as tf

    setup = tasks.Setup(bench.parse_args(["--quick", "--data-dir", shared_data]))

    def first_labels(seed, global_seed):
        tf.random.set_seed(global_seed)  # what the run before left behind
        setup.seed = seed
        train, _, _ = setup.datasets("lenet_mnist")
        return next(iter(train))[1].numpy().tolist()

    assert first_labels(1, 0) == first_labels(1, 7) == first_labels(1, 1)
    assert first_labels(1, 0) != first_labels(2, 0)


def test_plot_draws_every_method(monkeypatch, tmp_path):
    """More methods than markers: each still gets its line and legend entry."""
    from benchmarks.suite import plots

    path = part_seeds.rows_path(str(tmp_path), "lenet_mnist")
    for m in part_seeds.METHODS:
        for t in (0.5, 0.9):
            part_seeds.append_row(path, {
                "method": m, "target": t, "seed": 0, "accuracy": 0.9, "sparsity": t,
                "wall_time_s": 1.0, "epochs": 20, "epoch_accuracy": [0.9], "setting": {}})
    drawn = []
    monkeypatch.setattr(plots, "_save_fig", lambda fig, p: drawn.append(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    part_seeds.plot(str(tmp_path), ["lenet_mnist"])
    assert len(part_seeds.METHODS) > 8
    assert sorted(drawn[0]) == sorted(part_seeds.LABELS[m] for m in part_seeds.METHODS)
