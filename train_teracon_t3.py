"""Stage 3: learn task 3 with TERACON on top of stage 2 (see trainer.py)."""
from trainer import main
from utils import cli

if __name__ == "__main__":
    cli(lambda: main(stage=3))
