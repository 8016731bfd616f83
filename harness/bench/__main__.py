"""`python -m harness.bench`: the throughput benchmark (harness/bench/throughput.py), same flags."""

import sys

from harness.bench.throughput import main

sys.exit(main())
