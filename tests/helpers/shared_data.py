"""Where the shared data is: `LLMM_DATA_DIR`, else ../shared/data beside the project; read once, at import, as a
test may unset the variable for the program it runs. Tests reach it only through the `data_dir` fixture
(tests/conftest.py), which fails a test under CI (`CI` set, as CI services set it) and skips it elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

FOLDER = Path(os.environ.get("LLMM_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
