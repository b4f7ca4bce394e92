"""The built-in Gemini Live emulator: the Live API wire protocol over TLS, for tests and offline use.

See :mod:`appliance.emulator.server` for the protocol it speaks and the faults it can inject, and
``tests/harness/emulator.py`` for starting it from tests.
"""
