import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def shared_data():
    if not os.path.isdir(os.path.join(SHARED_DATA, "mnist")):
        pytest.fail(f"Test data missing: expected ../shared/data at {SHARED_DATA}")
    return SHARED_DATA
