"""The README and docs/ pages point at things that exist: every relative Markdown link or image names a file or
folder of the repository, every ``#anchor`` names a heading of its page (GitHub's anchor rules), and every
``make <target>`` written in code names a target of the Makefile. Host-free and fast (no ComfyUI import)."""
from __future__ import annotations

import fnmatch
import json
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# `make demo`, `make comfyui MODELS=…`, `COMFYUI_PATH=… make test`: the first word after make that is no assignment.
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+(?:-\S+\s+)*(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*([A-Za-z0-9][\w.*-]*)")
MAKE_RULE = re.compile(r"^([A-Za-z0-9_.-][\w. -]*?)\s*::?(?!=)")


def doc_files(root: Path = ROOT) -> list:
    """README.md and every Markdown page under docs/."""
    files = [root / "README.md"] if (root / "README.md").exists() else []
    return files + sorted((root / "docs").rglob("*.md")) if (root / "docs").is_dir() else files


def split_code(text: str):
    """(prose lines, code texts): fenced blocks and inline code spans are code; links are read from prose only."""
    prose, code, fenced = [], [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
            continue
        code += [m.group(2) for m in CODE_SPAN.finditer(line)]
        prose.append(CODE_SPAN.sub("", line))
    return prose, code


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: Markdown links reduced to their text, lower case, punctuation and symbols
    other than '-' and '_' removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"<[^>]+>", "", text).lower()
    # github-slugger keeps letters, marks, decimal digits, connector punctuation ('_'), '-' and spaces: '²' goes.
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LM"
                   or unicodedata.category(c) in ("Nd", "Pc"))
    return text.replace(" ", "-")


def anchors(text: str) -> set:
    """Every heading's anchor of a page; a repeated heading gets -1, -2, … as on GitHub."""
    seen, out, fenced = {}, set(), False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def make_targets(makefile: Path) -> set:
    targets = set()
    for line in makefile.read_text(encoding="utf-8").split("\n"):
        if line.startswith(("\t", "#")) or ":=" in line.split("#")[0] or "?=" in line or "+=" in line:
            continue
        m = MAKE_RULE.match(line)
        if m:
            targets.update(t for t in m.group(1).split() if not t.startswith("."))
    return targets


def problems(root: Path = ROOT, files=None) -> list:
    """One line per broken link, missing anchor or unknown make target in ``files`` (default: README + docs/)."""
    files = doc_files(root) if files is None else files
    targets = make_targets(root / "Makefile") if (root / "Makefile").exists() else set()
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(root)
        prose, code = split_code(text)
        for target in (m.group(1) for line in prose for m in LINK.finditer(line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if file_part and not dest.exists():
                found.append(f"{where}: link to a missing file: {target}")
                continue
            if fragment:
                if dest.is_dir() or dest.suffix.lower() != ".md":
                    found.append(f"{where}: anchor on a file that is not a Markdown page: {target}")
                elif fragment not in anchors(dest.read_text(encoding="utf-8")):
                    found.append(f"{where}: no heading for the anchor #{fragment} in {dest.relative_to(root)}")
        for name in sorted({m.group(1) for snippet in code for m in MAKE.finditer(snippet)}):
            if not fnmatch.filter(sorted(targets), name):  # `make bench-*` names a family of targets
                found.append(f"{where}: `make {name}` is not a target of the Makefile")
    return found


def note_problems(root: Path = ROOT) -> list:
    """The "Read me" notes of example_workflows/*.json name docs pages and sections (``docs/x.md#anchor``, paths
    in the pack's folder): each must exist."""
    found = []
    for path in sorted((root / "example_workflows").glob("*.json")):
        nodes = json.loads(path.read_text(encoding="utf-8")).get("nodes", [])
        for text in (str((n.get("widgets_values") or [""])[0]) for n in nodes if n.get("type") == "Note"):
            for page, fragment in re.findall(r"\b(docs/[\w./-]+?\.md)(?:#([\w-]+))?", text):
                if not (root / page).is_file():
                    found.append(f"{path.name}: its note names a missing page {page}")
                elif fragment and fragment not in anchors((root / page).read_text(encoding="utf-8")):
                    found.append(f"{path.name}: its note names {page}#{fragment}, which has no such heading")
    return found


def test_readme_and_docs_links_files_anchors_and_make_targets_exist():
    assert len(doc_files()) > 1, "README.md and docs/*.md are missing"
    assert problems() == []


def node_classes(root: Path = ROOT) -> dict:
    """The pack's node classes (``class UniversalGuidance…`` in nodes/*.py) and their display names (``NAME``)."""
    found = {}
    for path in sorted((root / "nodes").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^class (UniversalGuidance\w+)\(.*?\n((?:    .*\n|\s*\n)*)", text, re.M):
            name = re.search(r'^    NAME = "([^"]+)"', m.group(2), re.M)
            found[m.group(1)] = name.group(1) if name else None
    return found


def test_every_node_has_a_reference_section_and_a_readme_row():
    nodes = node_classes()
    assert len(nodes) >= 18 and all(nodes.values()), nodes
    reference = (ROOT / "docs" / "nodes.md").read_text(encoding="utf-8")
    sections = anchors(reference)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for cls, name in nodes.items():
        section = anchor(f"{name} (`{cls}`)")
        assert section in sections, f"docs/nodes.md has no section '### {name} (`{cls}`)'"
        assert f"[{name}](docs/nodes.md#{section})" in readme, f"README's node table has no row for {name}"


def test_workflow_notes_name_existing_docs_sections():
    assert note_problems() == []


def test_a_workflow_note_naming_a_missing_section_is_reported(tmp_path):
    write(tmp_path, {"docs/nodes.md": "# Nodes\n\n## UG Move Object\n",
                     "example_workflows/a.json": json.dumps({"nodes": [{"type": "Note", "widgets_values": [
                         "Docs: docs/nodes.md#ug-move-object, docs/nodes.md#ug-resize, docs/gone.md"]}]})})
    assert note_problems(tmp_path) == ["a.json: its note names docs/nodes.md#ug-resize, which has no such heading",
                                       "a.json: its note names a missing page docs/gone.md"]


def test_github_anchor_rules():
    assert anchor("Universal KSampler (`UniversalGuidanceKSampler`)") == "universal-ksampler-universalguidanceksampler"
    assert anchor("Speed at 512² (`make bench-speed`)") == "speed-at-512-make-bench-speed"
    assert anchor("What every image term shares: `augment`") == "what-every-image-term-shares-augment"
    assert anchor("Self-guidance: move, resize and keep objects") == "self-guidance-move-resize-and-keep-objects"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A") == {"a", "a-1", "a-2"}


def write(root: Path, files: dict) -> list:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return [root / name for name in files if name.endswith(".md")]


@pytest.mark.parametrize("readme, expected", [
    ("See [the guide](docs/guide.md).", "link to a missing file: docs/guide.md"),
    ("![picture](docs/images/missing.png)", "link to a missing file: docs/images/missing.png"),
    ("See [knobs](docs/page.md#knobs).", "no heading for the anchor #knobs in docs/page.md"),
    ("See [here](#nowhere).", "no heading for the anchor #nowhere in README.md"),
    ("Run `make demo-fast` first.", "`make demo-fast` is not a target of the Makefile"),
    ("Each `make bench-*` target.", "`make bench-*` is not a target of the Makefile"),
    ("```\nCOMFYUI_PATH=/x make bench-all\n```", "`make bench-all` is not a target of the Makefile"),
])
def test_a_broken_link_anchor_or_make_target_is_reported(tmp_path, readme, expected):
    files = write(tmp_path, {"README.md": "# Title\n\n" + readme + "\n", "docs/page.md": "# Page\n\n## Other\n",
                             "Makefile": ".PHONY: demo test\ndemo: venv\n\techo make nothing\ntest:\n\ttrue\n"})
    found = problems(tmp_path, files)
    assert len(found) == 1 and expected in found[0], found


def test_good_links_anchors_and_targets_pass(tmp_path):
    files = write(tmp_path, {
        "README.md": "# Title\n\n[page](docs/page.md#other-section-make-test), [top](#title), [dir](docs/), "
                     "[web](https://example.com/x.md#y)\n\n```\nmake demo   # [not a link](nowhere.md)\n"
                     "make test PYTEST_ARGS=-x\n```\nUse `make test` (to make sure), `make te*`.\n",
        "docs/page.md": "# Page\n\n## Other section (`make test`)\n",
        "Makefile": "PY := python\nVAR ?= 1\ndemo test: venv\n\ttrue\n"})
    assert problems(tmp_path, files) == []
