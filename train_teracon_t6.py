"""Stage 6: learn task 6 with the chosen --method (TERACON by default) on top of stage 5
(see continual/training/loop.py)."""
from continual.training.loop import main
from utils import cli

if __name__ == "__main__":
    cli(lambda: main(stage=6))
