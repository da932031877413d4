"""Stage 6: learn task 6 with TERACON on top of stage 5 (see trainer.py)."""
from trainer import main
from utils import cli

if __name__ == "__main__":
    cli(lambda: main(stage=6))
