import atexit
import os
import signal
import sys

from harness.cli import main

code = main()
# Everything is recorded once main returns: a Ctrl-C during interpreter exit must not turn the exit code into a
# death by SIGINT.
signal.signal(signal.SIGINT, signal.SIG_IGN)
# The exit handlers still run (MLflow's, logging's, multiprocessing's, which stops the workers' server), then the
# process ends without the interpreter's own teardown of torch, transformers and MLflow: 2-5 s of freeing
# modules that does nothing for a process about to end (measured at the end of `harness run`).
atexit._run_exitfuncs()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing left to say there
        pass
os._exit(code if isinstance(code, int) else 1)
