"""CLIP backbone (OpenAI-exact on OpenAI's weights) with re-identification adaptations (its tokenizer is ``text``)."""
from model.clip.loader import load_clip
from model.clip.model import CLIP, VisionTransformer, VisualFeatures, build_clip
from model.clip.sie import SideInfoEmbedding

__all__ = ["CLIP", "SideInfoEmbedding", "VisionTransformer", "VisualFeatures", "build_clip", "load_clip"]
