"""How torch's OpenMP threads wait between parallel regions: set by the CLI before torch is loaded.

By default GNU OpenMP (libgomp, which torch's CPU wheels ship) keeps each idle
worker thread spinning for a while after every parallel region, so the next
region starts without a wake-up. On a quiet machine that costs nothing; on a
shared one a spinning worker burns the time slice another process needs, and
the thread the region waits for is descheduled, so every parallel region waits
for the scheduler. Code that runs many small operations (the block-sparse
kernel runs a dozen per chunk) then slows down by an order of magnitude.

With ``OMP_WAIT_POLICY=PASSIVE`` idle workers sleep at once and are woken for
the next region. libgomp reads the variable once, when torch loads it, so it
must be in the environment before ``import torch``: the ``attnlab`` command
sets it first thing; child processes (sweep runs, ``bench train``) inherit it.
It is not set when the user chose a policy (``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` already set) or opted out with ``ATTNLAB_NO_THREAD_TUNING=1``.
This module imports nothing heavy, so calling it cannot load torch.
"""

from __future__ import annotations

import os
import sys

NO_THREAD_TUNING = "ATTNLAB_NO_THREAD_TUNING"  # set to 1 to keep OpenMP's default waiting
WAIT_POLICY = "OMP_WAIT_POLICY"
_USER_CHOICES = (WAIT_POLICY, "GOMP_SPINCOUNT")


def opted_out() -> bool:
    return os.environ.get(NO_THREAD_TUNING, "").strip() not in ("", "0")


def passive_waits() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process and its children, unless opted out, chosen by the
    user, or too late (torch already imported). Returns whether it was set."""
    if opted_out() or any(v in os.environ for v in _USER_CHOICES) or "torch" in sys.modules:
        return False
    os.environ[WAIT_POLICY] = "PASSIVE"
    return True


def describe() -> dict:
    """The waiting setting in effect, for the machine description beside benchmark results."""
    return {name.lower(): os.environ.get(name) for name in _USER_CHOICES}
