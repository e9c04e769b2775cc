"""Model adapters. `config` is torch-free; `dit` and `loading` need torch."""
from soda.models.config import REGISTRY, ModelConfig, get_config, model_names

__all__ = ["REGISTRY", "ModelConfig", "get_config", "model_names"]
