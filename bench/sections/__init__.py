"""The benchmark's sections (python bench/run.py runs them in order), one module each.

Importing the package puts the repository and addons/ on sys.path: the sections measure the addons'
own code (tokens.py, config.py) and drive the real mitmdump through tests/harness.py.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "addons"))
sys.path.insert(0, str(REPO))
