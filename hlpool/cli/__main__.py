"""``python -m hlpool.cli``: the same as the ``hlpool`` command."""

import sys

from hlpool.cli.main import main

sys.exit(main())
