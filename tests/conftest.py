import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
