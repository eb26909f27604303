"""``python -m chatvec_lab.cli ARGS``: the same as ``chatvec ARGS``."""
import sys

from chatvec_lab.cli import main

sys.exit(main())
