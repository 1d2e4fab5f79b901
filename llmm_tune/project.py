"""Where the project's own files are: its checkout root and the search spaces it ships."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPACES_DIR = ROOT / "search_spaces"
