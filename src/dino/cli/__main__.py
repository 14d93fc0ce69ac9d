"""``python -m dino.cli``: the ``dino`` command (as ``torchrun -m dino.cli train …`` starts it)."""

import sys

from dino.cli import main

if __name__ == "__main__":  # not when a tool imports every module of the package
    sys.exit(main())
