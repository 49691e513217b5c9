"""aac-metrics' metric functions without its package __init__, which imports CLAP, torchaudio and
other dependencies that fense, fer, sbert_sim and spider_fl do not use (aac-metrics is installed
with --no-deps by scripts/setup.sh). Test and benchmark helper only."""
import importlib.util
import sys
import types


def _bare_package(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"{name} is not installed: scripts/setup.sh installs aac-metrics into .venv-ref")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    sys.modules[name] = module


for _package in ("aac_metrics", "aac_metrics.functional", "aac_metrics.utils"):
    _bare_package(_package)

import aac_metrics.functional.fer as fer_module  # noqa: E402,F401
from aac_metrics.functional.fense import fense  # noqa: E402,F401
from aac_metrics.functional.fer import BERTFlatClassifier, fer  # noqa: E402,F401
from aac_metrics.functional.spider_fl import _spider_fl_from_outputs  # noqa: E402,F401
