"""Progress bars that suit where they are written: a terminal, a notebook or a log file.

Every progress bar of the library comes from :func:`tqdm` here. In a terminal it is
tqdm's usual bar. When standard error is not a terminal (a CI log, a file, a pipe) a bar
redraws at most every :data:`LOG_INTERVAL_S` seconds (``$FLOWCODEC_PROGRESS_INTERVAL``
overrides it). tqdm's default of ten redraws a second would fill a log with hundreds of
carriage-return updates. In a Jupyter notebook tqdm's widget is used, unthrottled.

Example
-------
>>> from flowcodec.progress import tqdm
>>> total = 0
>>> for i in tqdm(range(3), desc="demo", disable=True):
...     total += i
>>> total
3
"""

from __future__ import annotations

import os
import sys

__all__ = ["tqdm", "LOG_INTERVAL_S", "log_interval"]

#: Seconds between redraws of a bar whose output is not a terminal.
LOG_INTERVAL_S = 30.0


def log_interval() -> float | None:
    """Seconds between redraws for the current standard error; ``None`` for a terminal or
    a notebook (tqdm's own defaults apply)."""
    from tqdm import auto

    if any(c.__name__ == "tqdm_notebook" for c in auto.tqdm.__mro__):
        return None  # a notebook widget: redraws cost no log lines
    stream = sys.stderr
    try:
        if stream is not None and stream.isatty():
            return None
    except (AttributeError, ValueError):  # a closed or unusual stream
        pass
    env = os.environ.get("FLOWCODEC_PROGRESS_INTERVAL")
    if env:
        try:
            return max(0.0, float(env))
        except ValueError:
            pass
    return LOG_INTERVAL_S


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)`` with a redraw rate suited to the output: when
    standard error is not a terminal, ``mininterval`` (and ``maxinterval``) default to
    :func:`log_interval` seconds and the bar is drawn in ASCII."""
    from tqdm.auto import tqdm as _tqdm

    every = log_interval()
    if every is not None:
        kwargs.setdefault("mininterval", every)
        kwargs.setdefault("maxinterval", max(every, kwargs["mininterval"]))
        kwargs.setdefault("ascii", True)
    return _tqdm(*args, **kwargs)
