"""Benchmarks: what the harness costs against plain scripts. Not product code: nothing of the product imports it.

    python -m harness.bench             # throughput: a sweep through the harness against plain TRL scripts
    python -m harness.bench --gpu       # tokens/s, memory against the estimate, MFU at 1B/8B shapes (tiny on a CPU)
    python -m harness.bench.scoring     # scoring preference pairs: one batch per pair against the batched way
    python -m harness.bench.tracking    # what tracking one training step in MLflow costs

Recorded results and how they were made: results/benchmarks/README.md.
"""
