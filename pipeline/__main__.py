"""python -m pipeline {data,proposals,inspect}"""

import sys

from pipeline.cli import main

COMMANDS = {
    "data": "pipeline.demo_data",
    "proposals": "pipeline.proposals",
    "inspect": "pipeline.inspector",
}

if __name__ == "__main__":
    sys.exit(main("pipeline", COMMANDS))
