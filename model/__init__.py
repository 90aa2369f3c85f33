"""Models: the CLIP backbone (``model/clip``), the SVPR-ReID components (``model/svpr``), the CLIP-ReID
baselines, the model contract (``model/contract.py``) and the registry that builds them by ``MODEL.ARCH_NAME``.
"""
from model.contract import LossSpec, ModelOutput, ReIDModel
from model.registry import MODELS, build_model, register_model

__all__ = ["LossSpec", "MODELS", "ModelOutput", "ReIDModel", "build_model", "register_model"]
