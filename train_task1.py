"""Stage 1: pretrain NextItNet on next-item prediction (see continual/training/loop.py)."""
from continual.training.loop import main
from utils import cli

if __name__ == "__main__":
    cli(lambda: main(stage=1))
