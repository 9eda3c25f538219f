"""mechbias's progress lines go through the standard ``logging`` module, under the logger ``"mechbias"``.

Each module logs to ``logging.getLogger(__name__)`` (a child of ``"mechbias"``) at INFO. A library leaves the
output to its user: nothing is printed until a handler is attached, as Python's logging does for every
library. The command line attaches :func:`log_to_console` (lines prefixed ``[mechbias]`` on standard error);
in a notebook, call it to see the same lines, or configure ``logging`` as you like. Progress bars (tqdm) are
separate and unchanged.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "mechbias"


class _ConsoleHandler(logging.Handler):
    """Writes each record to the current ``sys.stderr`` (looked up when it is written, so a redirected or
    captured stream receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # never let a progress line break a run
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> logging.Handler:
    """Print mechbias's progress lines at ``level`` and above to standard error as ``[mechbias] message``
    (what the command line shows). Calling it again changes the level and adds no second handler.

    Args:
        level: the lowest level shown (``logging.INFO`` by default; ``logging.DEBUG`` shows more).

    Returns:
        The handler (remove it with ``logging.getLogger("mechbias").removeHandler(handler)``).
    """
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    for h in logger.handlers:
        if isinstance(h, _ConsoleHandler):
            return h
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("[mechbias] %(message)s"))
    logger.addHandler(handler)
    return handler
