"""Ctrl-C during a run: the first asks the loop to checkpoint and stop at the next step boundary."""

from __future__ import annotations

import signal


class InterruptFlag:
    """First Ctrl-C sets ``requested`` (the loop checkpoints and stops after the step); a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[postrl] Ctrl-C: finishing this step, writing a checkpoint, then stopping "
              "(press Ctrl-C again to abort without saving).", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
