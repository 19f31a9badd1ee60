"""Reading a JSON object that a user hands us (a model's config.json, a tokenizer's config)."""

import json
from pathlib import Path

from core.errors import UserError


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; a file that is not one is a UserError naming it, in one line."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not readable as JSON: {reason}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value
