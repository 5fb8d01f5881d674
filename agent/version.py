"""The version of dvr, from one source: `[project] version` in pyproject.toml.

Installed from a wheel, the package metadata holds it (`importlib.metadata`). Run from a
checkout (editable, as scripts/install.sh installs it, or never installed) the pyproject.toml
beside the packages is read instead: metadata found there can be stale (an editable install
made before the version changed, or a `dvr.egg-info` an older build left in the checkout,
which shadows the installed metadata for anything started from the checkout). With neither,
the version is `UNKNOWN`, which says so rather than guessing.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "dvr"
UNKNOWN = "0+unknown"


def from_checkout(pyproject: Path | None = None) -> str | None:
    """The version the pyproject.toml of the checkout this module is in declares (or of the
    one given), or None when there is none or it is not dvr's (an installation has none)."""
    if pyproject is None:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    version = project.get("version")
    return version if project.get("name") == DISTRIBUTION and isinstance(version, str) else None


def from_metadata() -> str | None:
    """The installed distribution's version, or None when dvr is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def find_version() -> str:
    return from_checkout() or from_metadata() or UNKNOWN


VERSION: str = find_version()
