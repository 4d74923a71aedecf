"""The library's logger (`wan.fast`): start-up lines (which backend runs each op, whether CUDA
graphs are on) and notes such as what a `compile()` call did.

Messages go through `logging` at INFO. A program that configured no logging at all (upstream's
scripts do not) would never see them, since Python's last-resort handler only shows warnings: in
that case, and only then, the first message gives the logger a handler of its own that writes to
stderr. `logging.getLogger("wan.fast").setLevel(logging.WARNING)` silences them.
"""
import logging
import sys

LOGGER_NAME = "wan.fast"
logger = logging.getLogger(LOGGER_NAME)


def info(message: str, *args) -> None:
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    logger.info(message, *args)
