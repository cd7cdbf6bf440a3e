"""churn: point-in-time customer churn and loyalty pipeline."""

from __future__ import annotations

__version__ = "0.1.0"


class ChurnError(Exception):
    """An expected, user-fixable problem: bad input, bad params, missing model.

    The CLI turns it into a one-line message and exit code ``exit_code``.
    """

    exit_code = 2
