"""Print what the wheelhouse would be built from, as JSON: a digest and each package's name and version.

The digest covers every source file (not caches), the constraints file, the build steps and the
building Python's version and platform, so the wheelhouse is rebuilt exactly when one of them
changed. `current` says whether the stamp in the wheelhouse already holds this digest. `sources`
maps each package name to its folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tomllib
from pathlib import Path

SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}


def source_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or path.suffix == ".pyc":
            continue
        if any(part in SKIPPED_PARTS or part.endswith(".egg-info") for part in relative.parts):
            continue
        files.append(path)
    return files


def project_identity(root: Path) -> tuple[str, str]:
    pyproject = root / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
        # Normalised (PEP 503 style, with underscores) so roles can name it either way.
        return project["name"].lower().replace("-", "_").replace(".", "_"), project["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as error:
        raise SystemExit(
            f"wheelhouse: cannot read [project] name and version from {pyproject}: {error}"
        ) from None


def optional_extras(root: Path) -> list[str]:
    """The names of [project.optional-dependencies] in root's pyproject.toml."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return list(project.get("optional-dependencies", {}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--constraints", type=Path, required=True)
    parser.add_argument("--stamp", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, action="append", default=[], help="build steps (file)")
    parser.add_argument("sources", type=Path, nargs="+")
    args = parser.parse_args()

    digest = hashlib.sha256()
    digest.update(f"{sys.version_info[:2]} {platform.machine()} {sys.platform}\n".encode())
    digest.update(args.constraints.read_bytes())
    for recipe in args.recipe:
        digest.update(recipe.read_bytes())
    packages, sources = {}, {}
    for root in args.sources:
        name, version = project_identity(root)
        # Every optional extra goes into the package's wheels too (orchestratord[postgresql]: asyncpg), so
        # a host that turns one on later installs it from the same archive, without an index.
        extras = sorted(optional_extras(root))
        packages[name] = version
        sources[name] = str(root) + (f"[{','.join(extras)}]" if extras else "")
        for path in source_files(root):
            digest.update(f"\0{root.name}/{path.relative_to(root)}\0".encode())
            digest.update(path.read_bytes())
    hexdigest = digest.hexdigest()
    try:
        current = args.stamp.read_text().strip() == hexdigest
    except OSError:
        current = False
    print(json.dumps({"digest": hexdigest, "packages": packages, "sources": sources, "current": current}))


if __name__ == "__main__":
    main()
