"""The wheel a plain `pip install .` installs holds the whole program: every module of the
packages and every data file beside them (the built-in topology, the northbound schema), and
says the version the code reports.

The wheel is built from a copy of the checkout's files (tracked, or new and not ignored) with
the build backend pyproject.toml declares, installed in the venv by scripts/install.sh; what
it must hold is read from the same files, so a module or data file added later is checked
too. The installed wheel is then run alone (no checkout, no editable install on the path):
every module imports from it, and every file a module names in a `Path` constant exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

import agent.version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_ROOTS = ("agent", "dvr", "flows")
SKIPPED = ("__pycache__", ".pyc", ".pyo")


def checkout_files() -> list[PurePosixPath]:
    """The checkout's files as a build sees them: tracked or new, not ignored, present."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"], check=True, capture_output=True, text=True).stdout
        names = [PurePosixPath(n) for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        names = [PurePosixPath(p.relative_to(ROOT).as_posix()) for p in ROOT.rglob("*")
                 if p.is_file() and not {".git", ".venv", "build"} & set(p.relative_to(ROOT).parts)
                 and not p.parent.name.endswith(".egg-info")]
    return sorted(n for n in names if (ROOT / n).is_file()
                  and not any(s in n.parts or n.name.endswith(s) for s in SKIPPED))


def package_files() -> tuple[set[str], set[str]]:
    """(modules, data files) under the packages, as paths inside the wheel."""
    files = [n for n in checkout_files() if n.parts[0] in PACKAGE_ROOTS and len(n.parts) > 1]
    modules = {str(n) for n in files if n.suffix == ".py"}
    return modules, {str(n) for n in files} - modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel built from a fresh copy of the checkout (no stale build/ can leak in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in checkout_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, (
        "building the wheel failed (scripts/install.sh installs the build backend "
        f"{PYPROJECT['build-system']['requires']} in the venv):\n{build.stdout}{build.stderr}")
    wheels = sorted((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    yield wheels[0]
    shutil.rmtree(tmp, ignore_errors=True)


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def wheel_metadata(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as zf:
        [name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(name).decode()
    head = text.split("\n\n", 1)[0]
    return dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)


def test_the_checkout_has_what_the_wheel_must_hold() -> None:
    """Not vacuous: the expectations are read from the checkout and are not empty."""
    modules, data = package_files()
    for root in PACKAGE_ROOTS:
        assert f"{root}/__init__.py" in modules
    assert "agent/version.py" in modules
    assert {"flows/nb.ovsschema", "dvr/examples/default.yaml"} <= data


def test_the_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    modules, data = package_files()
    names = wheel_names(wheel)
    assert sorted(modules - names) == [], "modules missing from the wheel: a package not found"
    assert sorted(data - names) == [], (
        "data files missing from the wheel: add them to [tool.setuptools.package-data]")
    extra = sorted(n for n in names if n.split("/")[0] not in PACKAGE_ROOTS
                   and ".dist-info/" not in n)
    assert extra == [], "the wheel holds files outside the packages"


def test_the_wheel_says_the_version_the_code_reports(wheel: Path) -> None:
    meta = wheel_metadata(wheel)
    assert meta["Name"] == "dvr"
    assert meta["Version"] == PYPROJECT["project"]["version"] == agent.version.VERSION
    assert wheel.name.startswith(f"dvr-{agent.version.VERSION}-")
    assert meta.get("License-Expression") == PYPROJECT["project"]["license"]


# The modules Neutron loads (they import Neutron's own, installed where neutron-server runs)
INSIDE_NEUTRON = {"dvr.neutron.driver", "dvr.neutron.l3"}


# Run by the installed wheel's interpreter alone: imports every module from the wheel and
# checks every file a module-level constant (a Path, or a str naming a path) locates relative
# to the installation: inside it, it exists; outside it (beside the installation, where a
# checkout would be), a wheel cannot ship it.
PROBE = textwrap.dedent("""
    import importlib, json, pathlib, sys
    site = pathlib.Path(sys.argv[1]).resolve()
    found, missing, outside, elsewhere = [], [], [], []
    for name in json.loads(sys.argv[2]):
        if name in json.loads(sys.argv[3]):  # run inside neutron-server only
            continue
        module = importlib.import_module(name)
        if site not in pathlib.Path(module.__file__).resolve().parents:
            elsewhere.append(f"{name}: {module.__file__}")
        for attr, value in vars(module).items():
            if attr.startswith("__") or not isinstance(value, (str, pathlib.PurePath)) \
                    or not str(value).startswith("/"):
                continue
            path, where = pathlib.Path(value), f"{name}.{attr}"
            if path == site or site in path.parents:  # the root itself: a PYTHONPATH
                rel = path.relative_to(site).as_posix()
                (found if path.exists() else missing).append(f"{where}: {rel}")
            elif site.parent in path.parents or path == site.parent:
                outside.append(f"{where}: {path}")
    import agent.version
    print(json.dumps({"found": found, "missing": missing, "outside": outside,
                      "elsewhere": elsewhere, "version": agent.version.VERSION}))
""")


def test_the_installed_wheel_runs_alone_and_finds_its_files(
        wheel: Path, tmp_path: Path) -> None:
    installed = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(installed)
    names = sorted(n[:-3].replace("/", ".").removesuffix(".__init__")
                   for n in wheel_names(wheel) if n.endswith(".py"))
    # -S: no site-packages .pth (so no editable finder); the dependencies come after the wheel
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), *sorted(deps)])}
    run = subprocess.run([sys.executable, "-S", "-c", PROBE, str(installed), json.dumps(names),
                          json.dumps(sorted(INSIDE_NEUTRON))],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["elsewhere"] == [], "modules imported from outside the installed wheel"
    assert out["missing"] == [], "files the code names are missing from the installed wheel"
    assert out["outside"] == [], "files the code names outside its packages: not in a wheel"
    # not vacuous: the northbound schema and the built-in topology are named by constants
    found = {entry.split(": ", 1)[1] for entry in out["found"]}
    assert "flows/nb.ovsschema" in found, out["found"]
    assert out["version"] == wheel_metadata(wheel)["Version"]


def test_the_sample_configuration_is_in_step_with_the_options(tmp_path: Path) -> None:
    """agent/etc/agent.ini.sample is what oslo-config-generator makes of the options now:
    an option added, renamed or documented anew without regenerating it fails here."""
    from agent.config import ETC

    out = tmp_path / "agent.ini.sample"
    gen = Path(sys.executable).with_name("oslo-config-generator")
    run = subprocess.run([str(gen), "--namespace", "dvr-agent", "--wrap-width", "79",
                          "--output-file", str(out)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == (ETC / "agent.ini.sample").read_text(), (
        "regenerate: oslo-config-generator --config-file "
        "agent/etc/dvr-agent-config-generator.conf")
    assert "#bind_host =" in out.read_text() and "[metrics]" in out.read_text()


def test_the_systemd_unit_restarts_the_agent_after_open_vswitch() -> None:
    import configparser

    from agent.config import ETC

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ETC / "dvr-agent.service")
    assert unit["Service"]["Restart"] == "always"
    assert "openvswitch-switch.service" in unit["Unit"]["After"].split()
    exe, *args = unit["Service"]["ExecStart"].split()
    assert exe.endswith("/dvr-agent") and args == ["--config-file", "/etc/dvr/agent.ini"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
