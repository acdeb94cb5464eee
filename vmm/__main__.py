"""`python -m vmm` and the installed `vmm` command: the command line (tools/cli.py)."""
import sys

from tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
