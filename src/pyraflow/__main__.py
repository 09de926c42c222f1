"""``python -m pyraflow`` (and ``torchrun -m pyraflow``) runs the command line."""

import sys

from pyraflow.cli import main

sys.exit(main())
