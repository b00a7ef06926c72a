import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg.experiments import config, train
from tests.conftest import SHARED_DATA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "lenet_300_100_mnist_slt.yaml")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_config_rejects_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: mnist\nepoch: 3\n")
    with pytest.raises(ValueError, match="Unknown config key 'epoch' in .*c.yaml. Valid keys:"):
        config.load(str(path))


def test_config_overrides_are_typed():
    cfg = config.load(CONFIG, ["epochs=2", "target_sparsity=0.8", "limit=500"])
    assert cfg.epochs == 2 and cfg.target_sparsity == 0.8 and cfg.limit == 500
    with pytest.raises(ValueError, match="must be an integer"):
        config.load(CONFIG, ["epochs=two"])


def test_one_epoch_run_writes_every_output(shared_data, tmp_path):
    cfg = config.load(CONFIG, ["epochs=1", "limit=2048", "learning_rate=0.1", "test_limit=1000"])
    out = str(tmp_path / "run")
    metrics = train.run(cfg, shared_data, out)
    assert sorted(os.listdir(out)) == [
        "checkpoint.npz", "gated.keras", "history.png", "layers.png", "metrics.json",
        "stripped.keras", "tensorboard"]
    assert glob.glob(os.path.join(out, "tensorboard", "*", "events.out.tfevents.*"))
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["config"]["epochs"] == 1
    assert 0 < saved["sparsity"] < 1 and 0 < saved["test_accuracy"] <= 1
    assert len(saved["layers"]) == 3 and all("sparsity" in r for r in saved["layers"])
    assert 0 <= saved["fractional_gates"] <= 1 and saved["wall_time_s"] > 0
    assert len(saved["lambda"]["per_epoch"]) == 1 and len(saved["lambda"]["values"]) >= 10
    assert saved["versions"]["keras"] == keras.__version__
    stripped = keras.models.load_model(os.path.join(out, "stripped.keras"))
    gated = keras.models.load_model(os.path.join(out, "gated.keras"))
    x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype("float32")
    assert np.abs(np.asarray(stripped(x)) - np.asarray(gated(x))).max() <= 1e-5
    assert abs(metrics["sparsity"] - gated.sparsity()) < 1e-6


def test_cli_reports_bad_config_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([str(tmp_path / "missing.yaml")])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="'model' must be one of"):
        config.load(CONFIG, ["model=lenet5"])
    with pytest.raises(ValueError, match="'target_sparsity' must be a number or null"):
        config.load(CONFIG, ["target_sparsity=high"])
    with pytest.raises(ValueError, match="'post_training' gates a trained model: set 'pretrain_epochs'"):
        config.load(CONFIG, ["mode=post_training"])
    with pytest.raises(ValueError, match="Unknown config key 'lr'"):
        config.load(CONFIG, ["lr=0.1"])
    cfg = config.load(CONFIG, ["exclude=fc3"])
    assert cfg.exclude == ["fc3"]


def test_config_gate_start():
    cfg = config.load(CONFIG)
    assert cfg.init_mu == "auto" and cfg.target_ramp is None
    assert config.load(CONFIG, ["init_mu=random"]).init_mu == "random"
    assert config.load(CONFIG, ["init_mu=0.5", "target_ramp=0.4"]).init_mu == 0.5
    with pytest.raises(ValueError, match="'init_mu' must be a number, 'auto' or 'random', got 'open'"):
        config.load(CONFIG, ["init_mu=open"])
    with pytest.raises(ValueError, match="'init_mu' must be a number or a string, got \\[1\\]"):
        config.load(CONFIG, ["init_mu=[1]"])


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p)[:-5] for p in CONFIGS])
def test_every_config_loads_and_builds(path):
    cfg = config.load(path)
    assert cfg.name == os.path.basename(path)[:-5]  # the file name is the experiment name
    model = train.build_model(cfg)
    if model.count_params() > 5_000_000:
        return  # ResNets, ViT-B, Swin-T: building is the check; wrapping them is slow here
    gated = keras_stg.wrap(model, mode=cfg.mode, granularity=cfg.granularity,
                           exclude=cfg.exclude, target_sparsity=cfg.target_sparsity, seed=0,
                           init=cfg.init if cfg.mode == "slt" else None)
    assert gated.targets and 0 <= gated.sparsity() < 1


def test_post_training_pretrains_then_gates(shared_data, tmp_path):
    cfg = config.load(os.path.join(ROOT, "configs", "lenet_300_100_mnist_post_training.yaml"),
                      ["epochs=1", "pretrain_epochs=1", "limit=1024", "test_limit=500"])
    out = str(tmp_path / "pt")
    metrics = train.run(cfg, shared_data, out)
    assert metrics["pretrain"]["test_accuracy"] > 0.5  # a trained dense model
    dense = keras.models.load_model(os.path.join(out, "pretrained.keras"))
    gated = keras.models.load_model(os.path.join(out, "gated.keras"))
    # The frozen weights are the pre-trained ones.
    np.testing.assert_array_equal(dense.get_layer("fc1").kernel.numpy(),
                                  gated.base_model.get_layer("fc1").kernel.numpy())
    # `pretrained:` takes that file instead.
    cfg2 = config.load(os.path.join(ROOT, "configs", "lenet_300_100_mnist_post_training.yaml"),
                       ["epochs=1", "pretrain_epochs=0", "limit=512", "test_limit=200",
                        f"pretrained={os.path.join(out, 'pretrained.keras')}"])
    assert train.run(cfg2, shared_data, None)["pretrain"] is None


def _cli(out, *extra):
    return [sys.executable, "-m", "keras_stg.train", CONFIG, "--data-dir", SHARED_DATA,
            "--out", out, "--set", "epochs=3", "--set", "limit=2048", "--set", "test_limit=500",
            "--set", "learning_rate=0.1", *extra]


@pytest.mark.e2e
def test_resume_after_kill_gives_the_same_masks(shared_data, tmp_path):
    env = dict(os.environ)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    run_full = subprocess.run(_cli(full), env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert run_full.returncode == 0, run_full.stderr[-3000:]
    proc = subprocess.Popen(_cli(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(killed, "checkpoint.npz")
    deadline = time.time() + 240
    while not os.path.exists(checkpoint) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    with np.load(checkpoint) as f:
        done = json.loads(bytes(f["meta"]).decode())["epochs_completed"]
    assert 1 <= done < 3 and not os.path.exists(os.path.join(killed, "metrics.json"))
    resumed = subprocess.run(_cli(killed), env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}: {done} of 3 epochs done" in resumed.stdout
    a = keras.models.load_model(os.path.join(full, "gated.keras"))
    b = keras.models.load_model(os.path.join(killed, "gated.keras"))
    for ma, mb in zip(a.masks(), b.masks()):
        np.testing.assert_array_equal(ma, mb)
    # In fact the whole training state is bit-identical.
    with np.load(os.path.join(full, "checkpoint.npz")) as fa, np.load(checkpoint) as fb:
        for key in fa.files:
            if key != "meta":
                np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)
    ma, mb = (json.load(open(os.path.join(d, "metrics.json"))) for d in (full, killed))
    assert mb["resumed_at"] == [done] and ma["history"]["lam"] == mb["history"]["lam"]
    # A different config in the same folder is refused.
    clash = subprocess.run(_cli(killed, "--set", "seed=1"), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert clash.returncode == 2 and "checkpoint of a different config ('seed'" in clash.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_process_multi_worker_smoke(shared_data, tmp_path):
    cluster = {"worker": [f"localhost:{_free_port()}", f"localhost:{_free_port()}"]}
    out = str(tmp_path / "mw")
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        cmd = _cli(out, "--strategy", "multi_worker", "--set", "epochs=1", "--set", "limit=512",
                   "--set", "batch_size=64", "--set", "test_limit=200")
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(l[-3000:] for l in logs)
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["replicas"] == 2 and saved["strategy"] == "multi_worker"
    assert "test accuracy" in logs[0] and "test accuracy" not in logs[1]  # only the chief reports


def test_experiment_config_maps_onto_one_gate_config():
    cfg = config.load(CONFIG, ["target_sparsity=0.8", "exclude=[fc3]", "sigma=0.4",
                               "polish=0.25"])
    gate = cfg.gate_config().resolve()
    assert gate.polish == 0.25
    assert gate.penalty == keras_stg.TargetSparsity(0.8, lam=cfg.lam, ramp=0.0,
                                                    horizon=cfg.controller_horizon)
    assert (gate.mode, str(gate.granularity), gate.exclude, gate.sigma) == ("slt", "weight",
                                                                            ["fc3"], 0.4)
    assert gate.init == cfg.init and gate.init_mu == "random" and gate.seed == cfg.seed
    assert gate.init_density == (pytest.approx(0.2) if cfg.scale_fan else None)
    assert gate.penalty.rate == keras_stg.penalty.DEFAULT_RATE
    slow = config.load(CONFIG, ["controller_rate=0.01", "controller_error=absolute"])
    penalty = slow.gate_config().resolve().penalty
    assert (penalty.rate, penalty.error) == (0.01, "absolute")
    with pytest.raises(ValueError, match="`controller_rate` must be > 0"):
        config.load(CONFIG, ["controller_rate=0"]).gate_config()
    joint = config.load(CONFIG, ["mode=joint"]).gate_config().resolve()
    assert joint.init is None  # trained weights are kept outside slt mode
