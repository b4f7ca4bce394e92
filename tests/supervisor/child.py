"""A stand-in worker for arbiter tests: writes "pid monotonic_ns" heartbeats to a file.

Usage: child.py HEARTBEAT_FILE [--ignore-term] [--exit-now] [--no-beat] [--spin-after SECONDS]

``--spin-after S``: beat for S seconds, then burn CPU without beating (an overloaded worker).
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
spin_at = float(sys.argv[sys.argv.index("--spin-after") + 1]) if "--spin-after" in sys.argv else None
t0 = time.monotonic()
while True:
    if spin_at is not None and time.monotonic() - t0 > spin_at:
        while True:
            pass
    if "--no-beat" not in sys.argv:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {time.monotonic_ns()}")
        os.replace(tmp, path)
    time.sleep(0.05)
