"""python -m pipeline {data,proposals,inspect}"""

import sys

from pipeline.cli import main

COMMANDS = {
    "data": "pipeline.demo.data",
    "proposals": "pipeline.executors.proposals",
    "inspect": "pipeline.inspection.command",
}

if __name__ == "__main__":
    sys.exit(main("pipeline", COMMANDS))
