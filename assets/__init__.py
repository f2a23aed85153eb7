"""Data files shipped with lt-distill (see README.md in this folder for provenance and licences)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(name: str) -> Path:
    """Path of a shipped data file; raises FileNotFoundError naming it if absent."""
    path = ASSETS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"lt-distill asset {name!r} is missing from {ASSETS_DIR}")
    return path
