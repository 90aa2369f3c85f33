"""Keeping Ctrl-C and SIGTERM out of code that must not be cut in the middle.

Python raises ``KeyboardInterrupt`` (or, with the entry points' SIGTERM handler, ``SystemExit``) at whatever
bytecode the main thread runs when the signal arrives. Some library code cannot take that: a ``DataLoader``
iterator interrupted while it starts its worker processes is left half built, and its destructor then prints
``Exception ignored in ... AttributeError: ... '_workers_status'`` with a traceback. Inside
:func:`deferred_interrupts` those signals are held and delivered when the block ends.
"""
import contextlib
import signal
import threading

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT and SIGTERM during the block and deliver them, to the handlers in place before it, when it
    ends (in the order they came). Only the main thread receives Python signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda number, frame: received.append(number))
                for signum in INTERRUPTS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received:
            signal.raise_signal(signum)
