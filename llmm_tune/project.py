"""Where the project's own files are: the search spaces the package ships (package data, found through the
package, so an installed wheel has them too) and the folder records name data relative to."""

from importlib.resources import files
from pathlib import Path

SPACES_DIR = Path(str(files("llmm_tune") / "search_spaces"))
_PARENT = Path(__file__).resolve().parent.parent
# The checkout the package runs from (a clone, or an editable install of one); None for an installed wheel.
CHECKOUT = _PARENT if (_PARENT / "pyproject.toml").is_file() and (_PARENT / "llmm_tune").is_dir() else None
# Records name a data folder relative to the checkout (../shared/data beside it), so they resolve on another
# machine with the same layout; without a checkout, relative to the working directory.
ROOT = CHECKOUT or Path.cwd()
