import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real():
    """The bundled default model (SmolLM2-135M-Instruct), fetched once into STREAMLLM_HOME."""
    from streamllm.models import load_model

    return load_model("smollm2-135m", dtype="float32")
