"""python -m trainer {pretrain,finetune,evaluate,compare,study,efficiency,kernels,predict,export,
pseudo-label}"""

import sys

from pipeline.cli import main

COMMANDS = {
    "pretrain": "trainer.pretrain",
    "finetune": "trainer.finetune",
    "evaluate": "trainer.evaluate",
    "compare": "trainer.compare",
    "study": "trainer.study",
    "efficiency": "trainer.efficiency",
    "kernels": "trainer.kernels",
    "predict": "trainer.predict",
    "export": "trainer.export",
    "pseudo-label": "trainer.pseudo_label",
}

if __name__ == "__main__":
    sys.exit(main("trainer", COMMANDS))
