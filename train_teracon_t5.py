"""Stage 5: learn task 5 with TERACON on top of stage 4 (see trainer.py)."""
from trainer import main
from utils import cli

if __name__ == "__main__":
    cli(lambda: main(stage=5))
