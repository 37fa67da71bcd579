"""Library messages known to be harmless on a normal run, silenced so that real warnings stand out.

Each entry names exactly one message; anything else from the libraries still shows. See docs/architecture.md
("Warnings").
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex) of Python warnings that are library noise on a normal run.
HARMLESS_WARNINGS = (
    # transformers deprecates the attribute that PEFT still reads when it attaches an adapter.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
# (logger name, message prefix) of log records that are library noise on a normal run.
HARMLESS_LOG_RECORDS = (
    # bitsandbytes (imported by PEFT) tries an optional 4-bit CPU kernel package that agml never uses.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def silence_known_library_noise() -> None:
    """Install the filters above (a repeated call adds nothing new)."""
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefix in HARMLESS_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
