"""Stage 2: learn task 2 with TERACON on top of stage 1 (see trainer.py)."""
from trainer import main
from utils import cli

if __name__ == "__main__":
    cli(lambda: main(stage=2))
