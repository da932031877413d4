"""TTL-shaped task files: the command-line entry of continual.generators.ttl_shaped (its docstring and --help say what it writes)."""
import os
import sys

if __package__ in (None, ""):  # run as a file (python tools/…): import the suite from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from continual.generators import ttl_shaped  # noqa: E402
from utils import cli  # noqa: E402

main = ttl_shaped.main

if __name__ == "__main__":
    cli(main)
