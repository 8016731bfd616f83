"""`python -m harness.bench`: the throughput benchmark (harness/bench/throughput.py), same flags; with --gpu the GPU
benchmark (harness/bench/gpu.py: 1B and 8B shapes, memory against the estimate, MFU; tiny shapes on a CPU)."""

import sys

if "--gpu" in sys.argv[1:]:
    from harness.bench.gpu import main
else:
    from harness.bench.throughput import main

sys.exit(main())
