"""``python -m hfpg ...`` (and ``accelerate launch -m hfpg train ...``): the ``hfpg`` command."""

import sys

from .cli import main

sys.exit(main())
