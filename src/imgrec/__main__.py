"""``python -m imgrec``: the same as the ``imgrec`` command."""
import sys

from imgrec.cli import main

sys.exit(main())
