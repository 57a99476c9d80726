"""pyproject.toml against what the Comfy Registry requires (https://docs.comfy.org/registry/specifications, and
the checks of its publishing client comfy-cli: ``comfy node validate`` / ``comfy node publish``).

[project]: name (registry node id rules), version (X.Y.Z), license (table form), dependencies (= requirements.txt,
as ``comfy node init`` writes them), [project.urls] Repository (a real GitHub URL, or marked as a placeholder).
[tool.comfy]: PublisherId, DisplayName, Icon (optional; an https image URL when set), requires-comfyui (here, not in
[project]; comfy-cli's version format), no misspelt keys. The README's Install section must agree with it.
Fast, offline, part of ``make test``.
"""
from __future__ import annotations

import os
import re
import subprocess
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
from urllib.parse import urlparse

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
PLACEHOLDER = "PLACEHOLDER"
TESTED_COMFYUI = "0.3.64"  # the versioned host the suite runs on (make test-current, make test-manager)
# [tool.comfy] keys comfy-cli reads (comfy_cli/registry/config_parser.py, types.py), with ComfyUI's own parser.
TOOL_COMFY_KEYS = {"PublisherId", "DisplayName", "Icon", "Banner", "Models", "includes", "web", "version",
                   "requires-comfyui"}
# comfy-cli's validate_version(): each comma-separated part is [operator]major.minor.patch[-suffix].
COMFY_VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
GITHUB_REPO = re.compile(r"^https://github\.com/([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)/([A-Za-z0-9._-]+)$")


@pytest.fixture(scope="module")
def pyproject():
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def project(pyproject):
    return pyproject["project"]


@pytest.fixture(scope="module")
def comfy(pyproject):
    return pyproject["tool"]["comfy"]


def registry_name_problems(name: str) -> list[str]:
    """The registry's node-id rules for [project].name."""
    problems = []
    if not 0 < len(name) < 100:
        problems.append("must be 1 to 99 characters")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        problems.append("only letters, digits, '-', '_' and '.'")
    if re.search(r"[._-]{2}", name):
        problems.append("no consecutive special characters")
    if not re.match(r"[A-Za-z]", name):
        problems.append("must start with a letter (not a digit or special character)")
    if not re.search(r"[A-Za-z0-9]$", name):
        problems.append("must end with a letter or digit (PEP 508)")
    if "comfyui" in name.lower():
        problems.append("should not contain 'ComfyUI' (registry best practice)")
    return problems


def test_registry_name_rules_themselves():
    assert registry_name_problems("image-processor") == []
    assert registry_name_problems("super-resolution") == []
    assert registry_name_problems("ComfyUI-enhancer")
    assert registry_name_problems("123-tool")
    assert registry_name_problems("a--b")
    assert registry_name_problems("x" * 100)


def test_project_name_is_a_valid_registry_node_id(project):
    assert registry_name_problems(project["name"]) == [], project["name"]


def test_version_is_semver_x_y_z(project):
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert "version" not in project.get("dynamic", [])


def test_license_is_a_table_with_text_or_an_existing_file(project):
    lic = project.get("license")
    assert isinstance(lic, dict), 'license = { text = "MIT" } or { file = "LICENSE" }, not a bare string'
    assert lic.get("text", "").strip() or os.path.isfile(os.path.join(ROOT, lic.get("file", ""))), lic


def test_description_and_requires_python(project):
    assert project.get("description", "").strip()
    assert SpecifierSet(project["requires-python"]).contains("3.11")


def test_dependencies_are_the_requirements_txt_lines(project):
    """The registry shows [project].dependencies; ComfyUI-Manager installs requirements.txt: the same list."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [ln.split("#")[0].strip() for ln in f if ln.split("#")[0].strip()]
    assert sorted(project.get("dependencies", [])) == sorted(lines)
    assert not [d for d in lines if re.match(r"(torch|torchvision|torchaudio|facenet[-_]pytorch)\b", d, re.I)]


def test_requires_comfyui_is_under_tool_comfy_in_the_registry_format(project, comfy):
    assert "requires-comfyui" not in project, "requires-comfyui goes under [tool.comfy], not [project]"
    spec = comfy.get("requires-comfyui", "")
    assert spec, "set [tool.comfy] requires-comfyui"
    parts = [p.strip() for p in spec.split(",")]
    assert all(COMFY_VERSION_PART.match(p) for p in parts), f"comfy-cli would drop requires-comfyui = {spec!r}"
    assert SpecifierSet(spec).contains(Version(TESTED_COMFYUI)), f"{spec} excludes the tested ComfyUI {TESTED_COMFYUI}"


def test_tool_comfy_keys_publisher_and_display_name(comfy):
    assert set(comfy) <= TOOL_COMFY_KEYS, f"unknown [tool.comfy] keys (misspelt?): {set(comfy) - TOOL_COMFY_KEYS}"
    publisher = comfy.get("PublisherId", "")
    # Required to publish; the docs say it typically matches a GitHub user name: [a-z0-9] with single hyphens.
    assert re.fullmatch(r"[a-z0-9](?:-?[a-z0-9])*", publisher) and len(publisher) <= 39, publisher
    assert isinstance(comfy.get("DisplayName"), str) and comfy["DisplayName"].strip()
    assert isinstance(comfy.get("includes", []), list)


def test_icon_is_absent_or_an_https_image_url(comfy):
    """Optional. When set: an https URL of an SVG, PNG, JPG or GIF (max 800 x 400 px); "" is not a URL."""
    if "Icon" not in comfy:
        return
    icon = comfy["Icon"]
    url = urlparse(icon)
    assert url.scheme == "https" and url.netloc, f"Icon must be an https URL (or left out), not {icon!r}"
    assert url.path.lower().endswith((".svg", ".png", ".jpg", ".jpeg", ".gif")), icon


def _origin_url() -> str | None:
    try:
        out = subprocess.run(["git", "-C", ROOT, "remote", "get-url", "origin"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _normalized(url: str) -> str:
    url = re.sub(r"^git@github\.com:", "https://github.com/", url.strip())
    return re.sub(r"\.git$", "", url.rstrip("/")).lower()


def repository_is_marked_placeholder() -> bool:
    with open(PYPROJECT) as f:
        lines = f.read().splitlines()
    i = next(i for i, ln in enumerate(lines) if re.match(r"\s*Repository\s*=", ln))
    return any(PLACEHOLDER in ln for ln in lines[max(0, i - 3):i + 1])


def test_repository_url_is_real_or_marked_placeholder(project):
    """Real: this checkout's origin is that repository. Otherwise the line must say PLACEHOLDER (next to it)."""
    url = project["urls"]["Repository"]
    assert GITHUB_REPO.match(url), f"Repository must be https://github.com/<owner>/<repo>: {url}"
    origin = _origin_url()
    if origin and _normalized(origin) == _normalized(url):
        return
    assert repository_is_marked_placeholder(), (
        f"Repository = {url} is not this checkout's origin ({origin or 'no remote'}): mark it as a placeholder "
        f"with a comment containing {PLACEHOLDER} just above it, or fix the URL")


def install_section() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## Install\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Install' section"
    return m.group(1)


def test_readme_install_section_matches_the_metadata(project):
    section = install_section()
    url = project["urls"]["Repository"]
    assert url in section, "the README's clone / Git-URL instructions must use [project.urls] Repository"
    assert "cm-cli" in section and "Install via Git URL" in section
    # Registry search works only once the pack is published there; the README must not promise it before.
    assert re.search(r"not (yet )?(published|in the (Comfy )?[Rr]egistry)", section), \
        "say that searching the Manager for the pack works only once it is published to the Comfy Registry"
    if repository_is_marked_placeholder():
        assert PLACEHOLDER.lower() in section.lower() or "not published yet" in section, \
            "the README must say the repository URL is a placeholder while pyproject.toml does"
