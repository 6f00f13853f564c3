"""``python -m lorafit``: the ``lorafit`` command."""

import sys

from lorafit.cli import main

sys.exit(main())
