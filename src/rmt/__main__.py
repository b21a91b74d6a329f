"""``python -m rmt`` is the ``rmt`` command."""
import sys

from .cli import main

sys.exit(main())
