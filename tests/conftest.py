"""Shared fixtures: the real default model (SmolLM2-135M-Instruct) and real corpus windows, on CPU."""

import pytest
import torch


@pytest.fixture(scope="session")
def model_tok():
    from morphlib.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def model(model_tok):
    return model_tok[0]


@pytest.fixture(scope="session")
def model32():
    """(model, tokenizer): the real default model in float32 (the engine tests' and the CPU benchmark's)."""
    from morphlib.models import load_model

    model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    # Fresh (64-byte aligned) parameter storage: a loaded checkpoint can leave parameters 8-byte aligned,
    # and a single-row float32 GEMM on CPU rounds differently for different weight alignments.
    for p in model.parameters():
        p.data = p.data.clone()
    return model, tok


@pytest.fixture(scope="session")
def tok(model_tok):
    return model_tok[1]


@pytest.fixture(scope="session")
def heldout(tok):
    from morphlib.eval.corpus import make_windows

    return make_windows(tok, "heldout", 8, 256, seed=0)


@pytest.fixture(scope="session")
def calibration(tok):
    from morphlib.eval.corpus import make_windows

    return make_windows(tok, "calibration", 4, 256, seed=0)


@pytest.fixture(scope="session")
def rtn_morpher(model):
    from morphlib.morph import QuantConfig, prepare_morphing

    return prepare_morphing(model, QuantConfig(group_size=64, method="rtn"), progress=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is (the GPU machine: ``pytest -m gpu``); CI skips them, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
