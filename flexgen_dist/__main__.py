"""`python -m flexgen_dist ...`: the same command as `python -m flexgen_dist.run ...`."""

from .cli.shell import HeldSignals

if __name__ == "__main__":  # before the imports of .run, which take seconds (see run.py)
    HeldSignals.install()

from .cli.shell import exit_process  # noqa: E402
from .run import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
