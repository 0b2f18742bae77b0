"""Fault injection and fault scenarios: what a run survives, measured.

- ``faults``: named failpoints (``ASYNCRL_FAILPOINTS``) that kill or fail the process at a
  precise place (e.g. in the middle of a checkpoint write), for tests and the chaos report.
- ``report``: ``ScenarioResult`` and the table ``benchmarks/chaos_report.py`` prints.
"""
