"""Stage 4: learn task 4 with TERACON on top of stage 3 (see trainer.py)."""
from trainer import main
from utils import cli

if __name__ == "__main__":
    cli(lambda: main(stage=4))
