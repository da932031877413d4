"""The paper's comparison table and figure from compare.py's results.csv files: the command-line entry of continual.evaluation.paper_table (its docstring and --help say what it writes)."""
import os
import sys

if __package__ in (None, ""):  # run as a file (python tools/…): import the suite from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from continual.evaluation import paper_table  # noqa: E402
from utils import cli  # noqa: E402

main = paper_table.main

if __name__ == "__main__":
    cli(main)
