"""CLIP-ReID: the model (``model.py``) and its stage 1, prompt learning (``prompt_learning.py``)."""
from model.clip_reid.model import CLIP_ReID, prompt_length
from model.clip_reid.prompt_learning import PromptLearning

__all__ = ["CLIP_ReID", "PromptLearning", "prompt_length"]
