"""Preference data: rows -> token ids with the exact prompt/response boundary -> padded batches.

See docs/data.md for the accepted formats, the boundary, truncation and the errors.
"""

from .collate import COLLATORS, IGNORE_INDEX, PaddingCollator, build_collator
from .datamodule import PreferenceDataModule
from .errors import DataError
from .formats import Layout, PreferenceExample, UnpairedExample, detect_layout, to_example, unpair
from .kto import KTOCollator
from .preprocess import TOKENIZED_FIELDS, UNPAIRED_FIELDS, preprocess_split
from .render import RenderedPair, render
from .sources import load_source
from .tokenize import TokenizeConfig, TokenizedSide, tokenize_pairs
from .tokenizer import load_tokenizer

__all__ = [
    "COLLATORS",
    "IGNORE_INDEX",
    "TOKENIZED_FIELDS",
    "UNPAIRED_FIELDS",
    "DataError",
    "KTOCollator",
    "Layout",
    "PaddingCollator",
    "PreferenceDataModule",
    "PreferenceExample",
    "RenderedPair",
    "TokenizeConfig",
    "TokenizedSide",
    "UnpairedExample",
    "build_collator",
    "detect_layout",
    "load_source",
    "load_tokenizer",
    "preprocess_split",
    "render",
    "to_example",
    "tokenize_pairs",
    "unpair",
]
