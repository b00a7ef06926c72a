"""Every model family x mode x granularity through the shared invariants."""

import pytest

import keras_stg
from tests import helpers

CASES = [
    (model, mode, gran)
    for model in helpers.MODELS
    for mode in ("slt", "post_training", "joint")
    for gran in ("weight", "unit")
]


@pytest.mark.parametrize("model_name,mode,granularity", CASES)
def test_invariants(model_name, mode, granularity, tmp_path):
    model = helpers.MODELS[model_name]()
    x, y = helpers.batch(model)
    gated = keras_stg.wrap(model, mode=mode, granularity=granularity, lam=1.0, seed=0)
    helpers.compile_gated(gated)
    helpers.check_invariants(gated, x, y, str(tmp_path))
