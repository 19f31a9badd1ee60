"""Hugging Face `transformers` remote code for twicing models, written into every export by `lm.hf_export`.

`configuration_twicing_gpt.py` and `modeling_twicing_gpt.py` are copied verbatim next to the
weights; they import nothing from `lm`. Nothing is imported here, so `lm` does not need transformers.
"""
