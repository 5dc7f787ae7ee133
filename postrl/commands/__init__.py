"""One module per ``postrl`` subcommand.

A command module ``postrl/commands/<name>.py`` defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code); optionally
``ACCEPTS_OVERRIDES = True`` to take trailing ``key=value`` words as dotted
config overrides. :mod:`postrl.cli` discovers the modules; keep their top-level
imports light (import torch and friends inside ``run``).
"""
