"""Stage 4: learn task 4 with the chosen --method (TERACON by default) on top of stage 3
(see continual/training/loop.py)."""
from continual.training.loop import main
from utils import cli

if __name__ == "__main__":
    cli(lambda: main(stage=4))
