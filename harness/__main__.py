import signal
import sys

from harness.cli import main

code = main()
# Everything is recorded once main returns: a Ctrl-C during interpreter exit (torch and MLflow take a moment
# to shut down) must not turn the exit code into a death by SIGINT.
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(code)
