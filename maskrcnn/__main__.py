"""``python -m maskrcnn`` (also what torchrun launches: ``torchrun ... -m maskrcnn train ...``)."""

import sys

from .cli.main import main

sys.exit(main())
