"""The `cost` part: training-step time of the plain model, ours and edge-popup."""

import time

from benchmarks.suite.common import EP_MOMENTUM, TASKS, log
from benchmarks.suite.tasks import _loss


def _step_time(model, optimizer, x, y, steps, repeats):
    import numpy as np

    model.compile(optimizer=optimizer, loss=_loss())
    model.fit(x, y, batch_size=len(x), epochs=2, verbose=0)  # trace and warm up
    xs, ys = np.concatenate([x] * steps), np.concatenate([y] * steps)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(xs, ys, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
        times.append((time.perf_counter() - start) / steps)
    return float(np.median(times))


def part_cost(setup, tasks, results, save):
    import keras
    import numpy as np

    import keras_stg
    from benchmarks.edge_popup import EdgePopupModel, init_like_ours, sgd_cosine

    for task in tasks:
        if setup.quick and task != "lenet_mnist":
            continue
        steps, repeats = (5, 2) if setup.quick else ((50, 5) if task == "lenet_mnist" else (10, 3))
        rng = np.random.default_rng(0)
        keras.backend.clear_session()
        probe = setup.build(task)
        x = rng.standard_normal((setup.batch_size,) + tuple(probe.input_shape[1:])).astype("float32")
        y = rng.integers(0, 10, setup.batch_size)
        log(f"cost {TASKS[task][2]}: plain step ({steps} steps x {repeats}) ...")
        row = {"title": TASKS[task][2], "batch": setup.batch_size, "steps": steps,
               "repeats": repeats}
        row["plain_ms"] = 1e3 * _step_time(probe, keras.optimizers.Adam(1e-3), x, y, steps, repeats)
        log(f"cost {TASKS[task][2]}: gated (slt) step ...")
        keras.backend.clear_session()
        gated = keras_stg.wrap(setup.build(task), mode="slt", target_sparsity=0.9, seed=0)
        row["gated_ms"] = 1e3 * _step_time(gated, keras.optimizers.Adam(setup.learning_rate),
                                           x, y, steps, repeats)
        for density in (0.5, 0.1):
            log(f"cost {TASKS[task][2]}: edge-popup step, k={density} ...")
            keras.backend.clear_session()
            model = init_like_ours(setup.build(task), 1.0 - density, seed=0)
            ep = EdgePopupModel(model, density=density, weight_decay=setup.ep_wd)
            row[f"ep_k{int(round(density * 100))}_ms"] = 1e3 * _step_time(
                ep, sgd_cosine(setup.ep_lr, 1000, EP_MOMENTUM), x, y, steps, repeats)
        log(f"  plain {row['plain_ms']:.2f} ms, gated {row['gated_ms']:.2f} ms, edge-popup "
            f"{row['ep_k50_ms']:.2f} ms (k=0.5) / {row['ep_k10_ms']:.2f} ms (k=0.1)")
        results["cost"][task] = row
        save()
