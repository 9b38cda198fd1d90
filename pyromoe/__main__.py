"""``python -m pyromoe``: the command line (:mod:`pyromoe.app.cli`)."""

import sys

from .app.cli import main

sys.exit(main())
