"""Progress bars that suit where they are written: a terminal, a notebook or a log file.

Every progress bar of the library comes from :func:`tqdm` here. In a terminal it is
tqdm's usual bar. When standard error is not a terminal (a CI log, a file, a pipe) a bar
redraws at most every :data:`LOG_INTERVAL_S` seconds (``$FLOWCODEC_PROGRESS_INTERVAL``
overrides it). tqdm's default of ten redraws a second would fill a log with hundreds of
carriage-return updates. Such a bar also takes ``set_postfix`` / ``set_description`` without
redrawing at once (tqdm redraws on every such call by default, which would undo the
throttle when a loop sets its postfix at each step); the new text shows at the next timed
redraw or when the bar closes. In a Jupyter notebook tqdm's widget is used, unthrottled.

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


_QUIET: dict[type, type] = {}


def _quiet(base: type) -> type:
    """A subclass of the tqdm class ``base`` whose postfix and description setters do not
    redraw unless asked (``refresh=True``): the bar's own timed redraws show them."""
    if base not in _QUIET:

        class QuietSetters(base):
            def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
                super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

            def set_postfix_str(self, s="", refresh=False):
                super().set_postfix_str(s, refresh=refresh)

            def set_description(self, desc=None, refresh=False):
                super().set_description(desc, refresh=refresh)

            def set_description_str(self, desc=None, refresh=False):
                super().set_description_str(desc, refresh=refresh)

        QuietSetters.__name__ = QuietSetters.__qualname__ = f"quiet_{base.__name__}"
        _QUIET[base] = QuietSetters
    return _QUIET[base]


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)`` with a redraw rate suited to the output: when
    standard error is not a terminal, ``mininterval`` (and ``maxinterval``) default to
    :func:`log_interval` seconds, the bar is drawn in ASCII, and ``set_postfix`` /
    ``set_description`` wait for the next timed redraw instead of redrawing at once."""
    from tqdm.auto import tqdm as _tqdm

    every = log_interval()
    if every is None:
        return _tqdm(*args, **kwargs)
    kwargs.setdefault("mininterval", every)
    kwargs.setdefault("maxinterval", max(every, kwargs["mininterval"]))
    kwargs.setdefault("ascii", True)
    return _quiet(_tqdm)(*args, **kwargs)
