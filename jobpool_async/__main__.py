"""``python -m jobpool_async``: run the demo (see ``jobpool_async._demo``)."""

from __future__ import annotations

import sys

from ._demo import main

if __name__ == "__main__":
    sys.exit(main())
