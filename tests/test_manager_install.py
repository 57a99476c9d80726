"""The pack installed by the real ComfyUI-Manager (comfyui-manager 4.3 from PyPI, its cm-cli), the way a user's
"Install via Git URL" does it, into a throwaway ComfyUI v0.3.64 + torch environment; then ComfyUI started with it.
See tests/manager_harness.py for exactly what runs.

Slow (minutes on a cold cache): runs only with UG_MANAGER_TEST=1, which ``make test-manager`` sets; a plain
``make test`` skips it. Asserts: the Manager cloned the pack and ran ``pip install`` for every requirements.txt line
(none skipped by its blacklists, remapped, or failed) and install.py; torch, torchvision, numpy and Pillow are
unchanged; facenet_pytorch imports; ComfyUI lists every node of the pack in GET /object_info.
"""
from __future__ import annotations

import os
import re

import pytest

import manager_harness as mh

if os.environ.get("UG_MANAGER_TEST") != "1":
    pytest.skip("slow ComfyUI-Manager install test: run `make test-manager` (UG_MANAGER_TEST=1)",
                allow_module_level=True)


def _tail(text: str, n: int = 4000) -> str:
    text = mh.readable(text)
    return text if len(text) <= n else "…" + text[-n:]


@pytest.fixture(scope="module")
def run():
    tarball = os.environ.get("CURRENT_TARBALL") or mh.DEFAULT_TARBALL
    if not os.path.isfile(tarball):
        pytest.skip(f"no ComfyUI v0.3.64 tarball at {tarball}")
    result = mh.install(tarball=tarball)
    print("\n---- ComfyUI-Manager (cm-cli install) transcript, without progress bars ----\n"
          + mh.readable(result.manager_log))
    return result


def test_manager_cloned_the_pack_by_git_url(run):
    log = run.manager_log
    assert f"CLONE into '{run.pack_dir}'" in log, _tail(log)
    assert os.path.isdir(os.path.join(run.pack_dir, ".git")) and os.path.isfile(os.path.join(run.pack_dir, "__init__.py"))
    assert "Installation was successful." in log and "[INSTALLED]" in log, _tail(log)
    assert run.manager_rc == 0, f"cm-cli exited {run.manager_rc}\n{_tail(log)}"


def test_nothing_the_manager_printed_says_it_failed(run):
    failures = mh.failure_lines(run.manager_log)
    assert not failures, "the Manager reported failures:\n" + "\n".join(failures) + "\n\n" + _tail(run.manager_log)


def test_no_requirement_was_skipped_or_remapped_by_the_manager(run):
    """The Manager skips a line whose package is on its blacklist (torch, torchvision, torchaudio, torchsde) or, when
    already installed, on its downgrade blacklist (also transformers, safetensors, kornia), and may remap names.
    Any of that means our line did not do what it says (ComfyUI's own requirements, such as safetensors, are
    therefore not listed in requirements.txt)."""
    lists = run.manager_lists
    skipped = mh.BLACKLIST_SKIP.findall(run.manager_log)
    hard = [s for s in skipped if re.split(r"[<>=!~;\[ ]", s)[0].strip().lower() in lists["pip_blacklist"]]
    assert not hard, (f"the Manager refused requirement(s) {hard}: they are on its pip blacklist "
                      f"{lists['pip_blacklist']} (never list torch & co.)")
    assert not skipped, f"the Manager skipped requirement(s) {skipped} (its downgrade blacklist)"
    remapped = mh.REMAP.findall(run.manager_log)
    assert not remapped, f"the Manager remapped requirement(s): {remapped}"
    installed = mh.pip_installed_lines(run.manager_log)
    missing = [ln for ln in run.requirements if ln not in installed]
    assert not missing, f"requirements.txt lines the Manager never pip-installed: {missing}\n{_tail(run.manager_log)}"


def test_the_manager_ran_install_py_which_installed_facenet_without_deps(run):
    cmds = mh.executed(run.manager_log)
    assert [run.python, "install.py"] in cmds or any(c[-1:] == ["install.py"] for c in cmds), _tail(run.manager_log)
    assert "Universal Guidance: pip install --no-deps facenet-pytorch==2.6.0" in run.manager_log, (
        "install.py did not install facenet-pytorch --no-deps (did something install it before, with its "
        "dependencies?)\n" + _tail(run.manager_log))


def test_torch_torchvision_numpy_pillow_unchanged(run):
    after = run.check.get("versions")
    assert after == run.before, f"changed by the install: before {run.before}, after {after}"


def test_facenet_pytorch_importable(run):
    facenet = run.check.get("facenet", {})
    assert facenet.get("importable"), facenet.get("error")
    assert facenet.get("version") == "2.6.0", facenet


def test_comfyui_registers_and_lists_every_node_of_the_pack(run):
    assert not run.check.get("registry_error"), run.check["registry_error"]
    own = run.check.get("pack_mapping")
    assert own and "UniversalGuidanceKSampler" in own and "UniversalGuidanceSampler" in own, run.check
    assert run.check["registered"] == own, "ComfyUI's in-process registry differs from the pack's mapping"
    assert not run.server_error, f"{run.server_error}\n{_tail(run.server_log)}"
    folder = os.path.basename(run.pack_dir)
    ours = [ln for ln in run.server_log.splitlines() if ln.rstrip().endswith("custom_nodes/" + folder)]
    assert ours and not [ln for ln in ours if "IMPORT FAILED" in ln], _tail(run.server_log)
    missing = [n for n in own if n not in run.object_info]
    assert not missing, f"GET /object_info lacks {missing}\n{_tail(run.server_log)}"
    modules = {run.object_info[n] for n in own}
    assert all(folder in m for m in modules), modules


@pytest.mark.xfail(reason="ComfyUI-Manager 4.3's opt-in unified resolver (use_unified_resolver / cm-cli --uv-compile; "
                          "off by default) compiles every pack's requirements afresh against ComfyUI's unpinned "
                          "'torch': open_clip_torch needs torch, so the lockfile pins the newest torch on PyPI",
                   strict=False)
def test_unified_resolver_mode_would_keep_torch_and_co(run):
    """Not the default path: only its collect and ``uv pip compile`` steps run (no install)."""
    u = run.unified
    if not u.get("success"):
        pytest.skip(f"uv pip compile did not run: {u.get('error', '')[-500:]}")
    changed = {k: (run.before[k], v) for k, v in u["pins"].items() if v != run.before.get(k)}
    assert not changed, f"the unified resolver's lockfile would change (installed, pinned): {changed}"
