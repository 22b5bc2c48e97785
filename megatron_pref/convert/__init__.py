"""Hugging Face <-> megatron-core checkpoint conversion (Llama, Mistral, Qwen2, GPT-2).

Public API (imports are lazy: ``import megatron_pref.convert`` does not import megatron-core):

* :func:`convert_hf_to_megatron` / :func:`convert_megatron_to_hf` -- the two converters;
* :func:`verify_conversion` / :func:`compare_logits` / :func:`megatron_logits` -- logit checks;
* ``checkpoint_io``: :func:`save_model_checkpoint`, :func:`load_model_checkpoint` (on the shared
  ``megatron_pref.checkpoint_format``; :func:`read_model_config`) -- the layout training ``--load`` reads;
* :class:`ConversionError` -- bad input, reported as one line before anything is written.

See docs/conversion.md.
"""

from megatron_pref.convert.errors import ConversionError

__all__ = [
    "ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf", "verify_conversion",
    "compare_logits", "megatron_logits", "save_model_checkpoint", "load_model_checkpoint",
    "read_model_config", "SUPPORTED",
]

_LAZY = {
    "convert_hf_to_megatron": "megatron_pref.convert.hf_to_megatron",
    "convert_megatron_to_hf": "megatron_pref.convert.megatron_to_hf",
    "verify_conversion": "megatron_pref.convert.verify",
    "compare_logits": "megatron_pref.convert.verify",
    "megatron_logits": "megatron_pref.convert.verify",
    "save_model_checkpoint": "megatron_pref.convert.checkpoint_io",
    "load_model_checkpoint": "megatron_pref.convert.checkpoint_io",
    "read_model_config": "megatron_pref.checkpoint_format",
    "SUPPORTED": "megatron_pref.convert.architectures",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_pref.convert' has no attribute {name!r}")
