"""deploy/apt-archive.sh, run for real on apt sources laid out as Debian writes them: the
stand-in images are built from the archive the host's apt uses, whatever it is."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECURITY = """Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""
MAIN = """Types: deb
Suites: bookworm bookworm-updates
URIs: http://mirror.example/debian
Components: main
"""


def archive(apt: Path, suite: str = "bookworm") -> subprocess.CompletedProcess[str]:
    script = REPO / "deploy" / "apt-archive.sh"
    return subprocess.run(
        ["bash", str(script), suite, str(apt)], capture_output=True, text=True, timeout=30
    )


def test_the_archive_comes_from_deb822_sources_in_either_field_order(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(SECURITY + "\n" + MAIN)
    found = archive(tmp_path)
    assert (found.returncode, found.stdout) == (0, "http://mirror.example/debian\n")


def test_the_archive_comes_from_a_one_line_list_with_options(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# a comment\n"
        "deb [signed-by=/usr/share/keyrings/k.gpg] http://proxy.example/deb bookworm main\n"
    )
    found = archive(tmp_path)
    assert (found.returncode, found.stdout) == (0, "http://proxy.example/deb\n")


def test_no_archive_for_the_suite_is_an_error_that_says_so(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(MAIN)
    found = archive(tmp_path, "trixie")
    assert found.returncode == 1
    assert "no Debian archive for trixie" in found.stderr
