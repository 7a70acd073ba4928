"""The docs hold to the code: docs/CLI.md is what the parsers print (regenerate it with
`python tests/test_docs.py --write`), the README's commands parse, the version matches the changelog, no page
speaks of development history, every link to a section names a heading that exists, every script in benchmarks/
starts (its imports resolve), and `pip wheel .` packs every module and the service page."""

import argparse
import functools
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def cli_markdown() -> str:
    """docs/CLI.md from the parsers: per command its line of help and a table of its flags."""
    from destseg.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    lines = ["# Command line reference", "",
             "Every `destseg` command and flag, as `destseg COMMAND --help` prints them on a CPU (where a default",
             "depends on the machine, its text says what runs on a CPU). `tests/test_docs.py` holds this page to the",
             "parsers.", "", "Commands: " + ", ".join(f"[`{c}`](#destseg-{c})" for c in COMMANDS) + ".", ""]
    for name, (help_text, _, _) in COMMANDS.items():
        lines += [f"## destseg {name}", "", help_text[0].upper() + help_text[1:] + ".", "",
                  "| flag | default | what it does |", "|---|---|---|"]
        for a in sub.choices[name]._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if a.option_strings:
                flag = ", ".join(f"`{o}`" for o in a.option_strings)
                if a.choices and not isinstance(a, argparse._StoreConstAction):
                    flag += " " + "\\|".join(str(c) for c in a.choices)
                elif a.nargs != 0:
                    flag += f" {a.metavar or a.dest.upper()}"
            else:
                flag = f"`{a.metavar or a.dest}`"
            plain = a.default in (None, False, argparse.SUPPRESS) or a.nargs == 0
            default = "required" if a.required else ("" if plain else f"`{a.default}`")
            lines.append(f"| {flag} | {default} | {(a.help or '').replace('|', chr(92) + '|')} |")
        lines.append("")
    return "\n".join(lines)


def test_cli_reference_is_what_the_parsers_say(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = cli_markdown()
    assert (ROOT / "docs" / "CLI.md").read_text() == expected, \
        "docs/CLI.md is out of date: python tests/test_docs.py --write"


def test_readme_commands_parse():
    """Every `destseg ...` line of the README's shell blocks parses with today's flags."""
    from destseg.cli import build_parser

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("destseg "):
                commands.append(shlex.split(line)[1:])
    assert len(commands) >= 7
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command does not parse ({exc.code}): destseg {' '.join(argv)}")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_scripts_start(script):
    """Each benchmark script answers --help: what it imports (destseg, the scripts beside it) is there."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]


def test_version_matches_the_changelog(capsys):
    import destseg
    from destseg.cli import main

    top = re.search(r"^## (\S+) \(", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert top == destseg.__version__
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"destseg {destseg.__version__}"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_product_does_not_speak_of_its_development_history():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "destseg").rglob("*.py")),
             *sorted((ROOT / "destseg").rglob("*.html"))]
    pattern = re.compile(r"\bsession \d|\bsessions? (before|ago)\b|\bissue #\d|#\d\d\b(?!\w)|\bSPEC\b|SPEC\.md")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for p in pages
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)


def _without_code_blocks(page: Path) -> str:
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)


@functools.cache
def _heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but - and _ dropped, spaces to -."""
    headings = re.findall(r"^#{1,6} (.+)$", _without_code_blocks(page), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_to_sections_name_headings_that_exist():
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)\s#]*)#([^)\s]+)\)", _without_code_blocks(page)):
            if target.startswith("http"):
                continue
            linked = page.parent / target if target else page
            if not linked.is_file() or anchor not in _heading_anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: ({target}#{anchor})")
    assert not broken, "\n".join(broken)


def test_readme_is_short_enough_to_follow():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


@pytest.mark.skipif(sys.platform != "linux", reason="builds with the venv's setuptools")
def test_wheel_has_every_module_and_the_service_page(tmp_path):
    pytest.importorskip("setuptools")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    import destseg

    wheel = next(tmp_path.glob(f"destseg-{destseg.__version__}-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "destseg").rglob("*.py")}
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "destseg").rglob("*.html")}
    assert pages and modules and not (modules | pages) - names, sorted((modules | pages) - names)
    assert any(n.endswith("entry_points.txt") for n in names)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        torch.cuda.is_available = lambda: False
        (ROOT / "docs" / "CLI.md").write_text(cli_markdown())
        print("wrote docs/CLI.md")
