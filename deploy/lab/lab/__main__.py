"""``python -m lab`` (with deploy/lab on sys.path): the same CLI as deploy/lab/lab.py."""

import sys

from .cli import main

sys.exit(main())
