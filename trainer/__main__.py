"""python -m trainer {pretrain,finetune,evaluate,compare,study,efficiency,kernels,predict,export,
pseudo-label}"""

import sys

from pipeline.cli import main

COMMANDS = {
    "pretrain": "trainer.stages.pretrain",
    "finetune": "trainer.stages.finetune",
    "evaluate": "trainer.stages.evaluate",
    "compare": "trainer.experiments.compare",
    "study": "trainer.experiments.study",
    "efficiency": "trainer.experiments.efficiency",
    "kernels": "trainer.experiments.kernels",
    "predict": "trainer.inference.predict",
    "export": "trainer.inference.export",
    "pseudo-label": "trainer.stages.pseudo_label",
}

if __name__ == "__main__":
    sys.exit(main("trainer", COMMANDS))
