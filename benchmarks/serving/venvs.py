"""Virtual environments for the peers, one each under a cache folder, created from pinned requirements on
first use and reused while the requirements file is unchanged."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path


def ensure_venv(cache: Path, name: str, requirements: Path) -> Path:
    """The python of `cache/name`, a venv holding `requirements`; built (minutes) when stale or absent."""
    if not requirements.is_file():
        raise FileNotFoundError(f"pinned requirements {requirements} not found")
    venv = cache / name
    python = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    print(f"creating the {name} environment in {venv} from {requirements.name} (first use only)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)
    stamp.write_text(digest)
    return python
