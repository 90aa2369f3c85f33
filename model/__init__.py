"""Models: the CLIP backbone and tokenizer (``model/clip``), the SVPR-ReID components (``model/svpr``),
the CLIP-ReID baselines, and a registry that builds any of them by ``MODEL.ARCH_NAME``.
"""
from model.registry import available_models, build_model, register_model

__all__ = ["available_models", "build_model", "register_model"]
