"""Secrets come from an environment variable or a file, never from YAML and never into a log line."""

from __future__ import annotations

import os
from typing import Any


def read_secret(env: str | None, file: str | None, *, field: str) -> str | None:
    """The secret named by ``env`` (variable name) or ``file`` (path; first line), or None when neither is set.
    Raises ValueError naming ``field`` (e.g. ``mqtt.password``) and what is missing, never the value."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ValueError(f"{field}_env: environment variable {env} is not set")
        return value
    if file:
        try:
            with open(file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"{field}_file: cannot read {file} ({exc.strerror})") from None
    return None


def absolute_file_keys(model: Any, root: str) -> None:
    """Make every ``*_file`` key of the pydantic ``model`` that holds a relative path absolute against ``root`` (the
    config file's directory): a process started from another working directory (systemd: /) reads the same files."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name.endswith("_file") and isinstance(value, str) and value and not os.path.isabs(value):
            setattr(model, name, os.path.normpath(os.path.join(root, value)))
