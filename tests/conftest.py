import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test models are tiny: on a shared 2-core machine torch's thread barriers cost 4-10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_config():
    """A 2-layer DiT with 16 tokens: fast enough for exhaustive checks."""
    from soda.models.config import ModelConfig

    return ModelConfig("dit-tiny", depth=2, hidden_size=32, patch_size=2, num_heads=4, input_size=8,
                       in_channels=4, num_classes=10)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    import torch

    from soda.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(tiny_config)
    model.randomize_zero_init(0)
    return model.eval()
