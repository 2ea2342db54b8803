import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SPLADE_TINY = SHARED / "models" / "splade-tiny"
BEIR = SHARED / "data" / "beir"

sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def splade_tiny_path() -> str:
    if not SPLADE_TINY.is_dir():
        pytest.skip(f"{SPLADE_TINY} is missing (the shared folder beside the repository)")
    return str(SPLADE_TINY)
