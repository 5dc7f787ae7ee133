"""``python -m postrl``, and ``torchrun --nproc-per-node N -m postrl train CONFIG`` (docs/scaling.md)."""

import os
import sys

from postrl.cli import main

if __name__ == "__main__":
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun: a failing rank's traceback goes into its summary
        from torch.distributed.elastic.multiprocessing.errors import record

        main = record(main)
    sys.exit(main())
