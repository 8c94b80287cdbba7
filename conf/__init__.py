"""dcam's YAML configuration, shipped as package data (works after a non-editable install)."""
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent


def conf_path(name: str) -> Path:
    """Path of conf/<name>.yaml (name may contain a group, e.g. 'model/tiny')."""
    p = CONF_DIR / f"{name}.yaml"
    if not p.exists():
        known = sorted(str(q.relative_to(CONF_DIR).with_suffix("")) for q in CONF_DIR.rglob("*.yaml"))
        raise FileNotFoundError(f"no config {name!r}; known: {known}")
    return p
