"""The bottom layer of twicing-lm: what every package shares and nothing else.

`core.errors` is the one exception a user can cause and how commands report it; `core.ranks`
says which process of a job this is, for every launcher. The packages depend one way:
core <- data_prep, launch <- lm (tests/test_layering.py enforces it).
"""
