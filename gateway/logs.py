"""structlog setup: console for people, JSON lines for production. Event names are stable and dotted.

Everything goes through one stdlib handler with structlog's ``ProcessorFormatter``: our own structlog events and the
records of third-party libraries that log through stdlib ``logging`` (asyncua, pymodbus, paho-mqtt, aiohttp,
aiosqlite, amqtt ...). So in production (``logging.format: json``) every line on stderr is one JSON object, a library's
traceback included (one record, the traceback in its ``exception`` field); library records carry ``logger`` (the
library's logger name) and their message as ``event``.
"""

from __future__ import annotations

import logging
import sys

import structlog

# third-party loggers: quiet unless asked (debug shows their info lines; warnings and errors always come through)
_NOISY = ("asyncua", "pymodbus", "amqtt", "transitions")  # chatty even at warning: errors only
_LIBRARIES = ("paho", "aiohttp", "aiosqlite", "asyncio", "nats", "psycopg", "urllib3")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our handler on the root logger (replaced, not duplicated, when configure() runs again)."""


def configure(fmt: str = "console", level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    if fmt == "json":
        render: list = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        render = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    formatter = structlog.stdlib.ProcessorFormatter(
        # records of other libraries: level, logger name, time, positional args merged, extra={...} kept
        foreign_pre_chain=[
            *shared,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ExtraAdder(),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    handler = _Handler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)  # our structlog events are filtered by level before they get here
    debug = lvl <= logging.DEBUG
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.ERROR)
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
