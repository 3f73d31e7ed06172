"""Suite-wide settings only; each tier keeps its own fixtures in tests/<tier>/conftest.py."""

import os

# Nothing may download at test time: tests read tiny models saved locally.
os.environ["HF_HUB_OFFLINE"] = "1"

pytest_plugins = ["localcluster.pytest_plugin"]
