"""Side-by-side benchmarks run by ``vigil bench NAME``.

Contract: each module ``benchmarks/<name>.py`` defines

    def run(quick: bool = False) -> dict[str, Any]

which runs Vigil *and its baselines in the same process*, and returns a JSON-serialisable dict
of results (the runner adds machine metadata, prints a table and writes the JSON). ``quick``
shrinks sizes so the bench finishes in seconds (used by tests); full runs produce the README
table. Optionally ``TARGETS: dict[str, str]`` documents the goals checked in the result under
a ``"targets"`` key (``{"name": {"goal": ..., "value": ..., "met": bool}}``).
"""
