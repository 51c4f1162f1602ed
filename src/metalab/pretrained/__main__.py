"""python -m metalab.pretrained NAME CHECKPOINT --results ... --licence ...: ship a checkpoint (see __init__)."""

import sys

from metalab.errors import MetalabError
from metalab.pretrained.ship import main

try:
    main()
except MetalabError as error:
    print(f"metalab: error: {error}", file=sys.stderr)
    sys.exit(error.exit_status)
