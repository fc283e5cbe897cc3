"""``python -m lazyfs``."""

import sys

from lazyfs.cli.main import main

sys.exit(main())
