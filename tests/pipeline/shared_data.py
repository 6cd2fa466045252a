"""Where the pipeline tests find the offline corpus (ontarget/offtarget .jsonl.gz)."""
import os
from pathlib import Path

import pytest


def _data_dir():
    """$MGD_DATA_DIR, else CI's ../shared/data beside the clone, else /work/shared/data."""
    candidates = [os.environ.get("MGD_DATA_DIR"),
                  Path(__file__).resolve().parents[3] / "shared" / "data", "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "ontarget.jsonl.gz").exists():
            return Path(c)
    return Path(candidates[1])


DATA = _data_dir()
SKIP_REASON = f"shared corpus not found in {DATA} (set MGD_DATA_DIR)"
needs_data = pytest.mark.skipif(not (DATA / "ontarget.jsonl.gz").exists(), reason=SKIP_REASON)
