"""CLIP backbone (OpenAI-exact on OpenAI's weights) with re-identification adaptations, and its tokenizer."""
from model.clip.loader import load_clip
from model.clip.model import CLIP, VisionTransformer, VisualFeatures, build_clip
from model.clip.sie import SideInfoEmbedding
from model.clip.tokenizer import tokenize

__all__ = ["CLIP", "SideInfoEmbedding", "VisionTransformer", "VisualFeatures", "build_clip", "load_clip",
           "tokenize"]
