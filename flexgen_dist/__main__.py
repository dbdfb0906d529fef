"""`python -m flexgen_dist ...`: the same command as `python -m flexgen_dist.run ...`."""

import sys

from .cli.signals import HeldSignals

if __name__ == "__main__":  # before the imports of .run, which take seconds (see run.py)
    HeldSignals.install()

from .run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
