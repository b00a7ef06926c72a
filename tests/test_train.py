import json
import os

import keras
import numpy as np
import pytest

import keras_stg
from keras_stg import config, train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "lenet_300_100_mnist_slt.yaml")


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
    cfg = config.load(CONFIG, ["epochs=1", "limit=2048", "learning_rate=0.1"])
    out = str(tmp_path / "run")
    metrics = train.run(cfg, shared_data, out)
    assert sorted(os.listdir(out)) == ["gated.keras", "history.png", "metrics.json", "stripped.keras"]
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["config"]["epochs"] == 1
    assert 0 < saved["sparsity"] < 1 and 0 < saved["test_accuracy"] <= 1
    assert len(saved["layers"]) == 3
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
