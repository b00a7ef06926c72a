import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "distribute_script.py")


@pytest.mark.e2e
def test_mirrored_strategy_matches_one_replica():
    out = subprocess.run(
        [sys.executable, SCRIPT], capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(SCRIPT)),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["mu_diff"] < 1e-3, result
    assert abs(result["lam"][0] - result["lam"][1]) < 1e-4, result
    assert abs(result["loss"][0] - result["loss"][1]) < 1e-3, result
    assert result["sparsity"][0] == result["sparsity"][1], result
    assert 0 < result["sparsity"][0] < 1, result
    assert result["moving_mean_diff"] < 1e-3, result
