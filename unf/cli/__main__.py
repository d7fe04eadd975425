"""``python -m unf.cli ...``: the same as the ``unf`` console script."""
import sys

from . import main

sys.exit(main())
