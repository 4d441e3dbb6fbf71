"""lab/apt_source.py: the lab's debootstrap takes its mirror and proxy from the host's apt.

Each test writes an apt configuration under tmp_path and runs the script as lab/image.sh
does, so what is pinned is the command's output and exit status. Mirror names use the
reserved `.example` domain: the repository names no real mirror.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "lab" / "apt_source.py"


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True, timeout=30
    )


def apt_root(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake root whose etc/apt holds FILES (paths relative to etc/apt)."""
    for name, text in files.items():
        path = tmp_path / "etc" / "apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def mirror_of(root: Path) -> subprocess.CompletedProcess[str]:
    return run("mirror", "--suite", "bookworm", "--root", str(root))


def test_one_line_sources_list_gives_its_main_archive(tmp_path):
    root = apt_root(
        tmp_path,
        {
            "sources.list": (
                "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] "
                "http://ftp.mirror.example/debian/ bookworm main contrib\n"
            )
        },
    )
    result = mirror_of(root)
    assert (result.returncode, result.stdout) == (0, "http://ftp.mirror.example/debian\n")


def test_deb822_sources_file_gives_its_main_archive(tmp_path):
    root = apt_root(
        tmp_path,
        {
            "sources.list.d/debian.sources": (
                "# written by the installer\n"
                "Types: deb deb-src\n"
                "URIs: https://mirror.example/debian\n"
                "Suites: bookworm bookworm-updates\n"
                "Components: main non-free-firmware\n"
                "Signed-By:\n"
                " -----BEGIN PGP PUBLIC KEY BLOCK-----\n"
                " .\n"
                " -----END PGP PUBLIC KEY BLOCK-----\n"
                "\n"
                "Types: deb\n"
                "URIs: https://mirror.example/debian-security\n"
                "Suites: bookworm-security\n"
                "Components: main\n"
            )
        },
    )
    result = mirror_of(root)
    assert (result.returncode, result.stdout) == (0, "https://mirror.example/debian\n")


def test_commented_and_disabled_entries_are_skipped(tmp_path):
    root = apt_root(
        tmp_path,
        {
            "sources.list": (
                "# deb http://old.mirror.example/debian bookworm main\n"
                "#deb http://older.mirror.example/debian bookworm main\n"
                "deb-src http://src.mirror.example/debian bookworm main\n"
            ),
            "sources.list.d/a-disabled.sources": (
                "Enabled: no\nTypes: deb\nURIs: http://disabled.mirror.example/debian\n"
                "Suites: bookworm\nComponents: main\n"
            ),
            "sources.list.d/b-debian.list": "deb http://live.mirror.example/debian bookworm main # the one\n",
        },
    )
    result = mirror_of(root)
    assert (result.returncode, result.stdout) == (0, "http://live.mirror.example/debian\n")


def test_sources_list_comes_before_sources_list_d_which_is_read_sorted(tmp_path):
    root = apt_root(
        tmp_path,
        {
            "sources.list.d/b.list": "deb http://b.mirror.example/debian bookworm main\n",
            "sources.list.d/a.sources": (
                "Types: deb\nURIs: http://a.mirror.example/debian\nSuites: bookworm\nComponents: main\n"
            ),
            "sources.list.d/0.list.disabled": "deb http://ignored.mirror.example/debian bookworm main\n",
        },
    )
    assert mirror_of(root).stdout == "http://a.mirror.example/debian\n"
    apt_root(tmp_path, {"sources.list": "deb http://first.mirror.example/debian bookworm main\n"})
    assert mirror_of(root).stdout == "http://first.mirror.example/debian\n"


def test_security_only_and_third_party_entries_give_no_mirror(tmp_path):
    root = apt_root(
        tmp_path,
        {
            "sources.list": (
                "deb http://security.mirror.example/debian-security bookworm-security main\n"
                "deb http://updates.mirror.example/debian bookworm-updates main\n"
                "deb https://vendor.example/apt nodistro main\n"
                "deb http://contrib.mirror.example/debian bookworm contrib\n"
                "deb cdrom:[Debian 12]/ bookworm main\n"
            )
        },
    )
    result = mirror_of(root)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "bookworm main" in result.stderr and "LAB_DEBIAN_MIRROR" in result.stderr


def test_no_sources_at_all_fails_with_one_line(tmp_path):
    result = mirror_of(tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr and "LAB_DEBIAN_MIRROR" in result.stderr


APT_DUMP = """\
Acquire "";
Acquire::http "";
Acquire::http::Proxy "http://proxy.example:3128/";
Acquire::http::Proxy::local.mirror.example "DIRECT";
Acquire::https::Proxy::tls.mirror.example "http://tls-proxy.example:8080";
APT::Architecture "amd64";
"""


@pytest.mark.parametrize(
    ("mirror", "proxy"),
    [
        ("http://ftp.mirror.example/debian", "http://proxy.example:3128/\n"),
        ("http://local.mirror.example/debian", ""),  # a per-host DIRECT wins
        ("https://tls.mirror.example/debian", "http://tls-proxy.example:8080\n"),
        ("https://other.mirror.example/debian", "http://proxy.example:3128/\n"),  # https falls back to http
        ("file:///srv/debian", ""),
    ],
)
def test_proxy_is_the_one_apt_uses_for_the_mirror(mirror, proxy):
    result = run("proxy", "--mirror", mirror, stdin=APT_DUMP)
    assert (result.returncode, result.stdout) == (0, proxy)


def test_no_proxy_configured_prints_nothing():
    dump = 'APT::Architecture "amd64";\n'
    result = run("proxy", "--mirror", "http://ftp.mirror.example/debian", stdin=dump)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
