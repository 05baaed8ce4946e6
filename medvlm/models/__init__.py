"""Model families behind one adapter interface (see :mod:`medvlm.models.base`)."""

from medvlm.models.base import IGNORE_INDEX, ImageSpan, ModelFamily  # noqa: F401
from medvlm.models.registry import (  # noqa: F401
    FAMILIES,
    LoadedModel,
    detect_family,
    get_family,
    load_model_and_processor,
)
