"""The CLI's one console, and how loud it is.

Quiet by default: a newcomer running `codetune demo` sees the pipeline's own lines, not transformers'
"Loading weights" / "Writing model shards" bars, library warnings (FutureWarning …) or FastStream's
per-task INFO lines. `codetune -v …` turns all of that back on (INFO logging to stderr, library bars,
every warning) and shows tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rich.console import Console

console = Console()

_verbose = False


def verbose() -> bool:
    return _verbose


def configure(loud: bool) -> None:
    """Set this process's library output: call once, before the command imports transformers & co."""
    global _verbose
    _verbose = loud
    if loud:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
        warnings.simplefilter("default")
        return
    # read by huggingface_hub at import (transformers follows it for its own tqdm bars) and by transformers
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # nats-py logs each failed connect attempt with a traceback; the flow says it in one line (FlowError)
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    if "huggingface_hub" in sys.modules:  # already imported: the variable above came too late
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


class _OneLine(logging.Filter):
    """Quiet mode: a library's record is its first line, without the traceback (-v shows it whole)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = record.getMessage().split("\n", 1)[0], None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def stage_logger() -> logging.Logger:
    """The logger in-process stages (`codetune demo`) give their broker: it propagates to this process's
    logging (WARNING when quiet, INFO with -v) instead of FastStream's own stdout handler at INFO, which
    prints a "callback for Task-N is being executed..." line per subscriber task at shutdown. Quiet, a
    subscriber task's transient error (a fetch timeout under load, retried by FastStream) is one line."""
    logger = logging.getLogger("codetune.stages")
    for f in [f for f in logger.filters if isinstance(f, _OneLine)]:
        logger.removeFilter(f)
    if not _verbose:
        logger.addFilter(_OneLine())
    return logger
