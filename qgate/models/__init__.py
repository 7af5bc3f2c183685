"""CT image-quality models (MD-IQA, Noise2Quality, Chest CT-IQA) behind one registry."""

from qgate.models._registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
