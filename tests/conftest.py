import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import gc  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: an end-to-end run in subprocesses (kept at the smallest size that "
        "still exercises it)")


def pytest_collection_finish(session):
    # TensorFlow, Keras and keras-hub are imported by now: millions of objects
    # that live for the whole session. Frozen, the garbage collector stops
    # scanning them on every collection (a full scan took seconds per test).
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # Keras' state is reset; Python's collector runs on its own schedule
    # (`free_memory=True` forces a full collection before every test).
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(os.path.join(SHARED_DATA, "mnist")):
        pytest.fail(f"Test data missing: expected ../shared/data at {SHARED_DATA}")
    return SHARED_DATA
