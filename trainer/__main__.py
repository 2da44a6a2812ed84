"""python -m trainer {pretrain,finetune,evaluate,compare}"""

import sys

from pipeline.cli import main

COMMANDS = {
    "pretrain": "trainer.pretrain",
    "finetune": "trainer.finetune",
    "evaluate": "trainer.evaluate",
    "compare": "trainer.compare",
}

if __name__ == "__main__":
    sys.exit(main("trainer", COMMANDS))
