"""Any stage K >= 2 (task 7 and beyond too): `--stage K`, or the stage after `--paths`
(see continual/training/loop.py)."""
from continual.training.loop import main
from utils import cli

if __name__ == "__main__":
    cli(main)
