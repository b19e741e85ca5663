"""Import the scripts of data/ as modules: data/ is a folder of scripts, not a package."""

import importlib.util
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def load(name):
    """Import data/<name>.py as module `name`, once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DATA_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
