#!/usr/bin/python3
"""The lab's command line: ``python3 deploy/lab/lab.py --help``.

The lab itself is the package ``lab/`` beside this file (README.md describes both): run as
a script, this file's directory is first on sys.path, and Python imports a package ahead
of a module of the same name, so ``import lab`` below finds the package, not this file.
"""

import sys

from lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
