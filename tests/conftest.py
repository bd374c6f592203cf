import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# No network at test time: make hub libraries fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch_threads = int(os.environ.get("EMGUARD_TEST_THREADS", "2"))


def pytest_addoption(parser):
    parser.addoption("--benchmarks", action="store_true",
                     help="also run the tests marked 'benchmark' (timed benchmark scripts)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``benchmark`` run timed benchmark scripts (DESIGN 8: performance is
    measured in benchmarks, not in timed tests): deselected unless ``--benchmarks`` is
    given or ``-m`` names the marker (``pytest -m benchmark``)."""
    if config.getoption("--benchmarks") or "benchmark" in (config.option.markexpr or ""):
        return
    timed = [item for item in items if item.get_closest_marker("benchmark")]
    if timed:
        config.hook.pytest_deselected(items=timed)
        items[:] = [item for item in items if not item.get_closest_marker("benchmark")]


@pytest.fixture(autouse=True, scope="session")
def _quiet_torch():
    import torch

    torch.set_num_threads(torch_threads)
    yield


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per session."""
    from emguard.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def data_file(tmp_path):
    """16 short chat rows ("What is i plus i?" -> "It is 2i.") as a JSONL file."""
    import json

    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n" for i in range(16)))
    return p


@pytest.fixture
def tiny_dir(tmp_path):
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path / "tiny")
