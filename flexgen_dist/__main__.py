"""`python -m flexgen_dist ...`: the same command as `python -m flexgen_dist.run ...`."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
