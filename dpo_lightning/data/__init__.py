"""Preference, KTO, SFT and prompt data: rows -> token ids with the exact prompt/response boundary -> padded
or packed batches.

See docs/data.md for the accepted formats, the boundary, truncation and the errors.
"""

from .base import TokenizedDataModule
from .collate import COLLATORS, IGNORE_INDEX, PaddingCollator, build_collator
from .columns import Layouts
from .datamodule import PreferenceDataModule
from .errors import DataError
from .formats import Layout, PreferenceExample, UnpairedExample, detect_layout, to_example, unpair
from .kto import KTOCollator, KTODataModule
from .kto_preprocess import UNPAIRED_FIELDS, preprocess_unpaired_split
from .packing import Packer, PackingCollator
from .preprocess import TOKENIZED_FIELDS, preprocess_split
from .render import RenderedPair, render
from .sft import SFTDataModule
from .sft_collate import SFT_COLLATORS, SFTPackingCollator, SFTPaddingCollator
from .sft_formats import Completion, Conversation, SFTLayout, detect_sft_layout, to_sft_example
from .sft_preprocess import SFT_FIELDS, preprocess_sft_split
from .sources import load_source
from .tokenize import TokenizeConfig, TokenizedSide, tokenize_pairs
from .tokenizer import load_tokenizer
from .window import WindowSampler, WithWindowTokens, window_tokens

__all__ = [
    "COLLATORS",
    "IGNORE_INDEX",
    "SFT_COLLATORS",
    "SFT_FIELDS",
    "TOKENIZED_FIELDS",
    "UNPAIRED_FIELDS",
    "Completion",
    "Conversation",
    "DataError",
    "KTOCollator",
    "KTODataModule",
    "Layout",
    "Layouts",
    "Packer",
    "PackingCollator",
    "PaddingCollator",
    "PreferenceDataModule",
    "PreferenceExample",
    "RenderedPair",
    "SFTDataModule",
    "SFTLayout",
    "SFTPackingCollator",
    "SFTPaddingCollator",
    "TokenizeConfig",
    "TokenizedDataModule",
    "TokenizedSide",
    "UnpairedExample",
    "WindowSampler",
    "WithWindowTokens",
    "build_collator",
    "detect_layout",
    "detect_sft_layout",
    "load_source",
    "load_tokenizer",
    "preprocess_split",
    "preprocess_unpaired_split",
    "preprocess_sft_split",
    "render",
    "to_example",
    "to_sft_example",
    "tokenize_pairs",
    "unpair",
    "window_tokens",
]
