"""``python -m liveupdate.kvcache``: the ``kvcache`` command."""

import sys

from liveupdate.kvcache.main import main

sys.exit(main())
