"""The package's logger ("jt_attention") and its once-per-process messages (a fallback
taken, an axis gathered): logged at the first call that takes it, not at every trace."""

import functools
import logging

logger = logging.getLogger("jt_attention")


@functools.cache
def log_once(message, level=logging.INFO):
    logger.log(level, message)
