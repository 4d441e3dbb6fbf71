#!/usr/bin/env python3
"""Where this machine's apt gets Debian from, for the lab's debootstrap.

The lab builds its base image with debootstrap, which needs a Debian mirror and,
behind a proxy, the proxy. Both are already configured on the host for apt, so the
lab takes them from there instead of naming a mirror in the repository:

    python3 lab/apt_source.py mirror [--suite bookworm] [--root /]
        prints the URI of the first enabled `deb` source that carries SUITE with the
        `main` component (one-line `*.list` and deb822 `*.sources` files, in apt's
        order: sources.list, then sources.list.d sorted); exit 1 with one line on
        stderr when there is none.
    apt-config dump | python3 lab/apt_source.py proxy --mirror URI
        prints the proxy apt would use for URI (Acquire::http::Proxy, or for an
        https URI Acquire::https::Proxy falling back to the http one; a per-host
        entry wins), or nothing when apt goes direct.

Standard library only: it runs with the system python3 before the venv exists.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# debootstrap fetches with wget (http, https) or reads a local tree (file); apt-only
# methods such as mirror+file:, cdrom: or tor+http: mean nothing to it.
DEBOOTSTRAP_SCHEMES = ("http", "https", "file")
# apt-config dump prints each option as `Name "value";` on one line.
_DUMP_LINE = re.compile(r'^(?P<name>\S+)\s+"(?P<value>.*)";\s*$')


@dataclass(frozen=True)
class Source:
    """One `deb` or `deb-src` entry as apt reads it: one URI, its suites and components."""

    kind: str
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str  # file and line, for messages

    def carries(self, suite: str, component: str) -> bool:
        return self.kind == "deb" and suite in self.suites and component in self.components


def parse_one_line(text: str, origin: str) -> Iterator[Source]:
    """Entries of a one-line-style file (`deb [options] uri suite [component...]`)."""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, rest = [*line.split(None, 1), ""][:2]
        if rest.startswith("["):  # options such as [arch=amd64 signed-by=...]
            closing = rest.find("]")
            if closing < 0:
                continue
            rest = rest[closing + 1 :].strip()
        words = rest.split()
        if kind not in ("deb", "deb-src") or len(words) < 2:
            continue
        yield Source(kind, words[0], (words[1],), tuple(words[2:]), f"{origin}:{number}")


def parse_deb822(text: str, origin: str) -> Iterator[Source]:
    """Entries of a deb822 `*.sources` file: stanzas split by blank lines, `Enabled: no` skipped."""
    stanza: dict[str, str] = {}
    start = 1
    last_field = ""

    def entries() -> Iterator[Source]:
        if stanza.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            return
        for kind in stanza.get("types", "").split():
            for uri in stanza.get("uris", "").split():
                yield Source(
                    kind,
                    uri,
                    tuple(stanza.get("suites", "").split()),
                    tuple(stanza.get("components", "").split()),
                    f"{origin}:{start}",
                )

    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.startswith("#"):
            continue
        if not raw.strip():
            yield from entries()
            stanza, last_field = {}, ""
            continue
        if raw[0] in " \t":  # continuation of the previous field (an inline Signed-By key)
            if last_field:
                stanza[last_field] += " " + raw.strip()
            continue
        name, colon, value = raw.partition(":")
        if not colon:
            continue
        if not stanza:
            start = number
        last_field = name.strip().lower()
        stanza[last_field] = value.strip()
    yield from entries()


def read_sources(root: Path) -> Iterator[Source]:
    """Every entry apt would read under ROOT, in apt's order."""
    etc = root / "etc" / "apt"
    files = [etc / "sources.list"]
    parts = etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parse = parse_deb822 if path.suffix == ".sources" else parse_one_line
        yield from parse(text, str(path))


def debian_mirror(sources: Iterable[Source], suite: str) -> str | None:
    """The first usable URI that carries SUITE/main: the Debian archive, not its -security or -updates."""
    for source in sources:
        if source.carries(suite, "main") and urlsplit(source.uri).scheme in DEBOOTSTRAP_SCHEMES:
            return source.uri.rstrip("/")
    return None


def apt_proxy(dump: str, mirror: str) -> str | None:
    """The proxy apt uses for MIRROR, from `apt-config dump`; None when it goes direct."""
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https"):
        return None
    options = {}
    for line in dump.splitlines():
        match = _DUMP_LINE.match(line.strip())
        if match:
            options[match["name"].lower()] = match["value"]
    host = (parts.hostname or "").lower()
    # apt's own order: a per-host entry before the scheme's default, and https
    # falling back to the http settings when it has none of its own.
    schemes = ("https", "http") if parts.scheme == "https" else ("http",)
    for scheme in schemes:
        for name in (f"acquire::{scheme}::proxy::{host}", f"acquire::{scheme}::proxy"):
            value = options.get(name)
            if value is not None:
                return None if value.upper() == "DIRECT" or value.lower() in ("", "false") else value
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mirror_cmd = commands.add_parser("mirror", help="print the host's Debian mirror")
    mirror_cmd.add_argument("--suite", default="bookworm")
    mirror_cmd.add_argument("--root", type=Path, default=Path("/"), help="read ROOT/etc/apt (tests)")
    proxy_cmd = commands.add_parser("proxy", help="print apt's proxy for a mirror (apt-config dump on stdin)")
    proxy_cmd.add_argument("--mirror", required=True)
    args = parser.parse_args(argv)

    if args.command == "mirror":
        mirror = debian_mirror(read_sources(args.root), args.suite)
        if mirror is None:
            print(
                f"apt_source: no enabled 'deb' source for {args.suite} main in "
                f"{args.root / 'etc/apt'}/sources.list or sources.list.d/ (*.list, *.sources); "
                "set LAB_DEBIAN_MIRROR to a Debian mirror",
                file=sys.stderr,
            )
            return 1
        print(mirror)
        return 0
    proxy = apt_proxy(sys.stdin.read(), args.mirror)
    if proxy:
        print(proxy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
