"""Secrets come from an environment variable or a file, never from YAML and never into a log line."""

from __future__ import annotations

import os


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
