"""Connector errors.

    ConnectorError            any failure talking to a device (carries connector id and endpoint)
    ├── ConnectorUnavailable  not connected / connect failed / timed out
    └── ReadFailed            the device answered with an error for a specific tag or block
"""

from __future__ import annotations


class ConnectorError(Exception):
    def __init__(self, message: str, *, connector: str, endpoint: str | None = None, tag: str | None = None) -> None:
        super().__init__(message)
        self.connector = connector
        self.endpoint = endpoint
        self.tag = tag


class ConnectorUnavailable(ConnectorError):
    pass


class ReadFailed(ConnectorError):
    pass
