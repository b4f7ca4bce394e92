"""A stand-in worker for arbiter tests: writes "pid monotonic_ns" heartbeats to a file.

Usage: child.py HEARTBEAT_FILE [--ignore-term] [--exit-now] [--no-beat]
"""

import os
import signal
import sys
import time

path = sys.argv[1]
if "--exit-now" in sys.argv:
    sys.exit(3)
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    if "--no-beat" not in sys.argv:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {time.monotonic_ns()}")
        os.replace(tmp, path)
    time.sleep(0.05)
