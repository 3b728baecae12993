"""``python -m ntcov`` (and ``torchrun ... -m ntcov``) runs the command line."""

import sys

from ntcov.cli import main

sys.exit(main())
