import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cloud.backends.base import Backend  # noqa: E402


class TableBackend(Backend):
    """A fake target for protocol tests only: logits depend on the last token (argmax = last + 1)."""
    name = "table"

    def __init__(self, n_vocab=32, n_ctx=64):
        self.n_vocab, self.n_ctx, self.calls = n_vocab, n_ctx, 0

    def logits(self, session_id, tokens, n_logits, reuse):
        self.calls += 1
        rows = np.zeros((n_logits, self.n_vocab), dtype=np.float32)
        for i, tok in enumerate(tokens[len(tokens) - n_logits:]):
            rows[i, (tok + 1) % self.n_vocab] = 5.0
        return rows, 0


@pytest.fixture
def table_backend():
    return TableBackend()
