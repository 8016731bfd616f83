"""The engine that runs variants: a session over the store, each variant in a worker process of its own.

    from harness.run.session import Session, run_grid

Rooms: `session` (open a parent run, run variants, close), `spawn` and `worker` (how a variant's process
starts and what it does), `progress` (what a person watching sees), `preflight` (checks before anything
trains), `ray` (variants as tasks on a Ray cluster).

Nothing is imported here: `python -m harness.run.worker` imports this package before it runs the worker, and
the worker must not load the session's machinery (nor be imported twice).
"""
