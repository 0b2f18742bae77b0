"""How many CPUs this process may run on: one answer for the deployment (how many cores vLLM
gets) and the snapshot codec (how many threads encode and decode). Imports nothing heavy, so
the deployment manager stays free of torch."""

from __future__ import annotations

import os

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """The CPUs in this process's affinity where the OS has one (a vLLM worker may be pinned
    to fewer than the machine has), else the machine's count; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
