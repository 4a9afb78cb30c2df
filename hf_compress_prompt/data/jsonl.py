"""JSON-lines files (task data, instruction sets): every record checked, a malformed one named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MissingResourceError, UserInputError

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Records of a JSON-lines file; each must be an object with the ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise MissingResourceError(f"{path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserInputError(f"{path}:{line_no} is not valid JSON ({error.msg}); fix or remove that line") from None
            if not isinstance(record, dict) or any(k not in record for k in required):
                raise UserInputError(f"{path}:{line_no} must be a JSON object with keys {list(required)}")
            records.append(record)
    if not records:
        raise UserInputError(f"{path} holds no records")
    return records
