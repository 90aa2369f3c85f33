"""Every prompt text of the framework, in one place.

The texts follow the authors' code word for word (double space and all: the tokenizer collapses it), so
tokenized prompts, and the learnable-token positions found in them, are those of the reference.
"""

# Token position of the first learnable "X" word (0 is the start-of-text token, then "a photo of a").
PROMPT_START = 5

# The noun the prompts end with: person benchmarks say "person", vehicle benchmarks (VeRi-776, VehicleID)
# say "vehicle", as CLIP-ReID's prompts do.
PERSON, VEHICLE = "person", "vehicle"


def prompt_stub(num_prompt_words, subject=PERSON):
    """``"A photo of a X X X X  person"`` with ``num_prompt_words`` learnable X words (``subject``: the noun)."""
    return f"A photo of a {'X ' * num_prompt_words} {subject}"


def attribute_caption(num_prompt_words, description):
    """Training text of an image with an attribute description or a caption."""
    return f"{prompt_stub(num_prompt_words)} with the following attributes: {description}"


def describe_attributes(pairs):
    """``"name is value, name is value."`` from ``(name, value)`` pairs (CP2108 writes names with underscores)."""
    return ", ".join(f"{name} is {value}" for name, value in pairs) + "."


def test_caption(num_prompt_words, suffix="", subject=PERSON):
    """Test-time text (no attributes known): the stub, a period and an optional dataset-specific sentence."""
    return f"{prompt_stub(num_prompt_words, subject)}.{(' ' + suffix) if suffix else ''}"


def model_test_caption(cfg):
    """The caption a model is given with an image of unknown attributes outside a dataset (FeatureExtractor,
    exported models): ``test_caption`` with MODEL.TEXT_PROMPT words and MODEL.PROMPT_SUBJECT, or None when
    MODEL.USE_TEXT is off."""
    if not cfg.MODEL.USE_TEXT:
        return None
    return test_caption(cfg.MODEL.TEXT_PROMPT, subject=cfg.MODEL.PROMPT_SUBJECT)


# Dataset-specific test sentences.
ATTRIBUTES_UNKNOWN = "Attributes are unknown."
ATTRIBUTES_NOT_AVAILABLE = "Attributes are not available."


def view_caption(num_prompt_words, view_word):
    """SVPR's view caption ``"A photo of a X X X X  person from <view word> view."``."""
    return f"{prompt_stub(num_prompt_words)} from {view_word} view."


# CLIP-ReID's identity prompt: the four X words are replaced by learned per-identity context vectors.
CLIP_REID_PREFIX = "A photo of a"
CLIP_REID_CONTEXT_WORDS = 4


def clip_reid_template(subject=PERSON):
    """CLIP-ReID's prompt ``"A photo of a X X X X person."`` (``"... vehicle."`` for vehicle benchmarks)."""
    return f"{CLIP_REID_PREFIX} {' '.join(['X'] * CLIP_REID_CONTEXT_WORDS)} {subject}."
