"""``python -m polyalign`` (also what torchrun launches)."""
import sys

from polyalign.cli import main

sys.exit(main())
