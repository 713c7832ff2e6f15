"""The docs hold together: every relative link in README.md, docs/*.md and triton_models/README.md points to a
file that exists and every ``#anchor`` to a heading that exists (GitHub's slug rules); every docs page is linked
from the README; the README stays a front door (under 150 lines, the two commands of a fresh machine, every
``segllm-edge`` subcommand). Standard library only: no package import."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "triton_models" / "README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ")"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code spans blanked."""
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield no, line


def strip_code_spans(line: str) -> str:
    return re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


def links(path: Path):
    """(line number, target) of every Markdown link and reference definition outside code."""
    for no, line in prose_lines(path.read_text(encoding="utf-8")):
        line = strip_code_spans(line)
        for m in LINK.finditer(line):
            yield no, m.group(1)
        m = REF_DEF.match(line)
        if m:
            yield no, m.group(1)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (markup removed), lower-cased, every character that is
    not a letter, digit, mark, underscore, hyphen or space dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                            # inline HTML tags
    text = text.strip().lower()
    kept = [c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LNM"]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives ``path``: heading slugs (a repeated slug gets -1, -2, ...) and HTML anchors."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        out.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for no, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):     # http:, https:, mailto: ...: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{no}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor:
            if dest.suffix.lower() != ".md" or dest.is_dir():
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading with the anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert page.is_file(), page
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if t.partition("#")[0]}
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"docs pages the README does not link: {missing}"


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 150, f"README.md has {len(text.splitlines())} lines; keep it under 150"
    code = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    for command in ("make demo", "make test"):
        assert re.search(rf"^{command}$", code, re.M), f"the README's bash block does not show `{command}`"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), f"the Makefile has no `{target}` target"


def cli_subcommands() -> set[str]:
    """The names of the ``segllm-edge`` subcommands, read from the sources (no import: click may be absent)."""
    names = set()
    for src in (ROOT / "segllm_edge").rglob("*.py"):
        text = src.read_text(encoding="utf-8")
        names.update(re.findall(r"@(?:main|click)\.command\(\s*[\"']([\w-]+)[\"']", text))
        for fn in re.findall(r"@main\.command\(\s*\)\s*\n(?:\s*@.*\n|\s+.*\n)*?def (\w+)", text):
            names.add(fn.replace("_", "-"))
    return names


def test_readme_lists_every_subcommand():
    names = cli_subcommands()
    assert {"demo", "chat", "bench", "export", "serve", "web"} <= names, names   # the parser still finds them
    text = README.read_text(encoding="utf-8")
    missing = sorted(n for n in names if not re.search(rf"`segllm-edge {re.escape(n)}[` ]", text))
    assert missing == [], f"subcommands missing from the README's command list: {missing}"


@pytest.mark.parametrize("heading, slug", [
    ("Quick start (fresh machine)", "quick-start-fresh-machine"),
    ("Accuracy on datasets: `segllm-edge eval`", "accuracy-on-datasets-segllm-edge-eval"),
    ("1. Graph rewrites at export (exact fp32)", "1-graph-rewrites-at-export-exact-fp32"),
    ("Memory per server (7B-width checkpoint)", "memory-per-server-7b-width-checkpoint"),
    ("Many conversations at once (`--max-concurrent-rounds`, `--max-queued-rounds`)",
     "many-conversations-at-once---max-concurrent-rounds---max-queued-rounds"),
    ("GPU path: CUDA, TensorRT, Jetson", "gpu-path-cuda-tensorrt-jetson"),
    ("What we learned about the stub (pytriton 0.7.0 / server 2.51)",
     "what-we-learned-about-the-stub-pytriton-070--server-251"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_a_broken_link_or_anchor_is_caught(tmp_path, monkeypatch):
    page = ROOT / "docs" / "cpu.md"
    bad = tmp_path / "page.md"
    bad.write_text("# Title\n\n[gone](no-such-file.md) [anchor](#no-such-heading) [ok](#title)\n"
                   "```\n[in code](ignored.md)\n```\n", encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    problems = broken_links(bad)
    assert len(problems) == 2 and "no such file" in problems[0] and "#no-such-heading" in problems[1], problems
    assert page.is_file()
