"""swarmllm as `pip install swarmllm` gives it: an sdist built from the project's files, a wheel built from the
unpacked sdist, installed (without dependencies) into a folder of its own and run from outside the repository."""

from __future__ import annotations

import ast
import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "swarmllm"
BUILD_TIMEOUT_S = 120


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _build(backend_call: str, source: Path, out: Path) -> Path:
    """Run one PEP 517 hook of setuptools in `source` (no network: the venv's setuptools, as pip's
    --no-build-isolation), returning the file it made in `out`."""
    code = f"import sys; from setuptools import build_meta as b; print(b.{backend_call}(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    try:
        import setuptools.build_meta  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the build backend (setuptools) is not importable offline: {e}")
    root = tmp_path_factory.mktemp("packaging")
    checkout = root / "checkout"  # the files an sdist is made of, without build/ or egg-info leftovers
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, checkout / name)
    if (REPO / "MANIFEST.in").exists():
        shutil.copy2(REPO / "MANIFEST.in", checkout / "MANIFEST.in")
    shutil.copytree(
        PACKAGE, checkout / "src" / "swarmllm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    dist = root / "dist"
    dist.mkdir()
    sdist = _build("build_sdist", checkout, dist)
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    wheel = _build("build_wheel", unpacked, dist)
    site = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, wheel],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outside = root / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    return {"wheel": wheel, "sdist": sdist, "site": site, "cwd": outside, "env": env}


def _run(installed: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=timeout
    )


def _wheel_names(installed: dict) -> list[str]:
    with zipfile.ZipFile(installed["wheel"]) as whl:
        return whl.namelist()


def test_wheel_holds_every_file_of_the_package(installed):
    """Every file of src/swarmllm (Python or read at run time: the page, the kernel's source, py.typed) is in the
    wheel built from the sdist."""
    expected = {
        p.relative_to(PACKAGE.parent).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    names = set(_wheel_names(installed))
    assert expected - names == set()
    assert {
        "swarmllm/monitor/page.html",
        "swarmllm/models/kernels/panel_gemm.cpp",
        "swarmllm/py.typed",
    } <= names


def test_installed_command_prints_its_version(installed):
    version = installed["wheel"].name.split("-")[1]  # the version the wheel's metadata carries
    script = installed["site"] / "bin" / "swarmllm"
    done = _run(installed, sys.executable, str(script), "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"swarmllm {version}"
    done = _run(installed, sys.executable, "-m", "swarmllm", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"swarmllm {version}"
    done = _run(installed, sys.executable, "-m", "swarmllm", "--help")
    assert done.returncode == 0, done.stderr
    assert "fetch" in done.stdout and "demo" in done.stdout


def test_every_module_of_the_wheel_imports_from_the_installed_copy(installed):
    modules = sorted(
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in _wheel_names(installed)
        if name.endswith(".py") and not name.endswith("__main__.py")
    )
    code = (
        "import importlib, sys\n"
        "from importlib import resources\n"
        "from swarmllm.models import panels\n"
        "outside = [m for m in sys.argv[2:] if not importlib.import_module(m).__file__.startswith(sys.argv[1])]\n"
        "print(outside)\n"
        "print(len(resources.files('swarmllm.monitor').joinpath('page.html').read_text()))\n"
        "print(panels.SOURCE.is_file(), panels.SOURCE.is_relative_to(sys.argv[1]))\n"
    )
    done = _run(installed, sys.executable, "-c", code, str(installed["site"]), *modules)
    assert done.returncode == 0, done.stderr[-3000:]
    outside, page_chars, kernel_source = done.stdout.splitlines()[-3:]
    assert outside == "[]"
    assert int(page_chars) == len((PACKAGE / "monitor" / "page.html").read_text())
    assert kernel_source == "True True"


def _third_party_imports(source: str) -> list[tuple[str, bool]]:
    """(top-level package, imported at module level) for each absolute import outside the standard library and
    swarmllm; imports under `if TYPE_CHECKING:` are left out (never run)."""
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("swarmllm", "__future__"):
                    found.append((top, lazy))
            visit(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(source), False)
    return found


def test_declared_dependencies_cover_the_imports(installed):
    """A package the code imports at module level is a dependency of the wheel (not one it happens to get through
    another package); one imported lazily, inside a function, is a dependency or in an extra users install."""
    with zipfile.ZipFile(installed["wheel"]) as whl:
        (metadata_name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_string(whl.read(metadata_name).decode())
        sources = {n: whl.read(n).decode() for n in whl.namelist() if n.endswith(".py")}
    required, extras = set(), set()
    for requirement in metadata.get_all("Requires-Dist"):
        name = _canonical(re.match(r"[A-Za-z0-9_.\-]+", requirement).group())
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", requirement)
        if extra is None:
            required.add(name)
        elif extra.group(1) != "dev":
            extras.add(name)
    providers = importlib.metadata.packages_distributions()
    missing = set()
    for path, source in sources.items():
        for top, lazy in _third_party_imports(source):
            dists = {_canonical(d) for d in providers.get(top, [top])}
            if not dists & (required | (extras if lazy else set())):
                missing.add(f"{path}: {top} ({', '.join(sorted(dists))})")
    assert not missing, "\n".join(sorted(missing))
