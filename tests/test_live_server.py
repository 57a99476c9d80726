"""The real ComfyUI server (``python -m headless serve``) with this pack, on 127.0.0.1 and a free port, and the
real frontend in headless Chromium: GET /object_info lists every node of the pack with tooltips, POST /prompt
rejects bad inputs naming node and input, and in the browser the node search finds the pack's nodes and
the image-guidance example workflow loads, queues and finishes (tiny random-weight checkpoint: the picture is noise).
Also in the browser (one session for all): a prompt the server refuses brings up the frontend's error dialog;
every example workflow loads with no node covering another node or a group; on the current frontend the node
search ranks the right node first for everyday queries, and the template browser lists the example workflows
with thumbnails.

The browser part needs the Debian package ``chromium`` and the Python package ``playwright`` (no browser download:
it drives /usr/bin/chromium); it is skipped with a message when either is missing. A screenshot goes to
out/live-server/; the canvas screenshot becomes docs/screenshot.png, and (current frontend) the pictures of
two workflows docs/workflow-*.png and every workflow's thumbnail example_workflows/<name>.jpg, when the file is
missing or UG_UPDATE_SCREENSHOT=1.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import workflow_files as wfiles
from conftest import ROOT
from headless import serve
from headless.host import pack_module
from headless.nodeinfo import ordered_inputs
from headless.ui_build import set_widgets
from headless.ui_to_api import ui_to_api

CHROMIUM = os.environ.get("UG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT = 150  # s, server start (imports torch and ComfyUI on a busy machine)
RUN_TIMEOUT = 180    # s, the queued workflow
SHOTS = os.path.join(ROOT, "out", "live-server")
# Small and short, for a CPU: these and the file names are the only changes to the image-guidance example workflow.
SPEED = {4: {"width": 32, "height": 32}, 5: {"steps": 2, "recurrence": 1}}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url, body, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Server:
    def __init__(self, url, workdir, proc, log):
        self.url, self.workdir, self.proc, self.log = url, workdir, proc, log

    def log_tail(self, n=3000):
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    """``python -m headless serve`` in a subprocess (its own process group), killed at teardown."""
    comfy = host.path
    try:
        serve.check_frontend(comfy)
    except serve.RunError as e:
        pytest.skip(f"no web frontend for this ComfyUI: {e}")
    workdir = str(tmp_path_factory.mktemp("live"))
    wfiles.write_reference(os.path.join(workdir, "input"))
    # Guidance-network files where users put them: the workdir's models/universal_guidance/<kind>/ and a second
    # --models root's universal_guidance/<kind>/ (names only: listing needs no valid weights).
    extra = str(tmp_path_factory.mktemp("extra-models"))
    for root, kind, name in ((os.path.join(workdir, "models"), "segmentation", LISTED_SEG),
                             (extra, "clip", LISTED_CLIP)):
        os.makedirs(os.path.join(root, "universal_guidance", kind), exist_ok=True)
        with open(os.path.join(root, "universal_guidance", kind, name), "wb") as f:
            f.write(b"not weights")
    port = free_port()
    log = os.path.join(workdir, "server.log")
    cmd = [sys.executable, "-m", "headless", "serve", "--comfyui", comfy, "--port", str(port), "--workdir", workdir,
           "--models", wfiles.TINY_MODELS_ROOT, "--models", extra, "--cpu"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}/", workdir, proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                get(srv.url + "object_info/VAEDecode", timeout=2)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer within {START_TIMEOUT} s:\n{srv.log_tail()}")
                time.sleep(0.5)
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@pytest.fixture(scope="module")
def pack_nodes(host):
    """The pack's own NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS, as ComfyUI loaded them."""
    module = pack_module()
    assert module.NODE_CLASS_MAPPINGS, "the pack loaded no nodes in the test host"
    return module.NODE_CLASS_MAPPINGS, module.NODE_DISPLAY_NAME_MAPPINGS


def test_pack_module_is_the_copy_comfyui_loaded_whatever_the_folder_name(host, monkeypatch):
    """In a checkout whose folder name is an identifier (e.g. ``main``), pytest imports the root ``__init__.py`` as
    a package of that name before ComfyUI boots: a copy without nodes, earlier in ``sys.modules`` than the one
    ComfyUI loaded. ``pack_module`` must still return ComfyUI's copy (and its submodules)."""
    import types

    from headless import host as host_module
    real = pack_module()
    assert real.NODE_CLASS_MAPPINGS, "the pack loaded no nodes in the test host"
    real_name = next(n for n, m in sys.modules.items() if m is real)
    fakes = {}
    for fake_name, mappings in (("ug_plain_copy", {}), ("ug_second_copy", {"UniversalGuidanceImage": object})):
        fake = types.ModuleType(fake_name)
        fake.__file__, fake.__path__ = os.path.join(ROOT, "__init__.py"), [ROOT]
        fake.NODE_CLASS_MAPPINGS = mappings
        fakes[fake_name] = fake
    monkeypatch.setitem(sys.modules, "ug_plain_copy", fakes["ug_plain_copy"])
    sys.modules[real_name] = sys.modules.pop(real_name)  # the plain copy now comes first
    assert pack_module() is real
    assert pack_module("nodes.comfy_bridge") is sys.modules[real_name + ".nodes.comfy_bridge"]
    monkeypatch.setitem(sys.modules, "ug_second_copy", fakes["ug_second_copy"])
    assert pack_module() is real  # the copy ComfyUI loaded, recorded when the host booted
    monkeypatch.setattr(host_module, "_LOADED_PACKS", {})  # without a record: the one copy that registered nodes
    del sys.modules["ug_second_copy"]
    assert pack_module() is real
    sys.modules["ug_second_copy"] = fakes["ug_second_copy"]
    with pytest.raises(RuntimeError, match="2 copies of it registered nodes"):
        pack_module()


def test_server_listens_on_loopback_only(server):
    with open(server.log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    assert "0.0.0.0" not in text
    assert server.url.startswith("http://127.0.0.1:")


LISTED_SEG = "lraspp_mobilenet_v3_large-in-workdir.pth"
LISTED_CLIP = "ViT-B-32-in-extra-root.safetensors"


def test_universal_guidance_folders_of_every_models_root_are_listed(server):
    info = get(server.url + "object_info", timeout=60)
    seg = info["UniversalGuidanceSegmentation"]["input"]["required"]["model"][0]
    clip = info["UniversalGuidanceCLIPText"]["input"]["required"]["clip_model"][0]
    assert LISTED_SEG in seg, seg
    assert LISTED_CLIP in clip, clip


def test_object_info_lists_every_pack_node_with_tooltips(server, pack_nodes):
    mappings, names = pack_nodes
    info = get(server.url + "object_info", timeout=60)
    assert set(mappings) <= set(info), set(mappings) - set(info)
    for node_type in mappings:
        entry = info[node_type]
        assert entry["display_name"] == names[node_type]
        assert entry["description"], node_type
        inputs = ordered_inputs(entry)
        assert inputs, node_type
        untipped = [name for name, spec, _ in inputs
                    if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip"))]
        assert not untipped, f"{node_type}: inputs without a tooltip: {untipped}"


def tiny_prompt(server_info):
    wf = wfiles.load(wfiles.path("image.json"))
    prompt = wfiles.substitute_files_api(ui_to_api(wf, server_info))
    for node_id, values in SPEED.items():
        prompt[str(node_id)]["inputs"].update(values)
    return prompt


def test_post_prompt_with_bad_inputs_names_node_and_input(server):
    info = get(server.url + "object_info", timeout=60)
    prompt = tiny_prompt(info)
    prompt["5"]["inputs"].update(start_percent=0.7, end_percent=0.3)
    status, body = post(server.url + "prompt", {"prompt": prompt, "client_id": "pytest"})
    assert status == 400, body
    errors = body["node_errors"]["5"]
    assert errors["class_type"] == "UniversalGuidanceKSampler"
    assert len(errors["errors"]) == 1, errors  # one message for the pair of inputs
    details = errors["errors"][0]["details"]
    assert details.startswith("Universal KSampler: inputs 'start_percent' and 'end_percent'"), details
    assert "the window from 0.7 to 0.3 is empty" in details

    prompt = tiny_prompt(info)
    del prompt["5"]["inputs"]["vae"]
    status, body = post(server.url + "prompt", {"prompt": prompt, "client_id": "pytest"})
    assert status == 400
    missing = body["node_errors"]["5"]["errors"]
    assert any(e["type"] == "required_input_missing" and e["extra_info"]["input_name"] == "vae" for e in missing)


def visible_dialogs(page) -> list[str]:
    """Texts of the dialogs on screen (2024-03: .comfy-modal, ``position: fixed``; newer frontends: PrimeVue
    dialogs). Visible = laid out with a non-empty box and not hidden by CSS (``offsetParent`` is null for fixed
    elements, so it cannot tell)."""
    return page.evaluate("""() => [...document.querySelectorAll('.comfy-modal, .p-dialog, [role=dialog]')]
        .filter(e => { const r = e.getBoundingClientRect(), st = getComputedStyle(e);
                       return r.width > 0 && r.height > 0 && st.display !== 'none' && st.visibility !== 'hidden'
                              && e.checkVisibility({checkOpacity: true, checkVisibilityCSS: true}); })
        .map(e => e.innerText.slice(0, 300))""")


def close_dialogs(page, timeout_s: float = 10.0):
    """Close what ``visible_dialogs`` sees: Escape, then the dialog's own close button."""
    deadline = time.monotonic() + timeout_s
    while visible_dialogs(page) and time.monotonic() < deadline:
        page.keyboard.press("Escape")
        time.sleep(0.3)
        page.evaluate("""() => document.querySelectorAll(
            '.comfy-modal .comfy-modal-close, .comfy-modal button, .p-dialog-close-button, .p-dialog-header-close')
            .forEach(b => { if (b.getBoundingClientRect().width > 0) b.click(); })""")
        time.sleep(0.3)
    assert visible_dialogs(page) == [], visible_dialogs(page)


# Node search box of the 2024-03 frontend (LiteGraph's) and of the current one (PrimeVue autocomplete).
SEARCH_INPUT = ".litesearchbox input, .comfy-vue-node-search-container input"
RESULT_ITEMS = ".litesearchbox .lite-search-item, .comfy-vue-node-search-container .p-autocomplete-option, " \
               ".p-autocomplete-overlay .p-autocomplete-option"


def search_results(page, query: str, timeout_ms: int = 15000) -> list[str]:
    """Double-click the empty canvas, type ``query`` into the node search box, return the result texts."""
    box = page.locator("canvas#graph-canvas").bounding_box()
    for attempt in range(3):  # a busy machine can swallow a double-click while the canvas is still settling
        page.mouse.dblclick(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
        try:
            page.locator(SEARCH_INPUT).filter(visible=True).first.wait_for(state="visible", timeout=timeout_ms)
            break
        except Exception:
            if attempt == 2:
                raise
    time.sleep(0.3)  # the box focuses its input once it is shown
    page.keyboard.type(query, delay=20)
    items = page.locator(RESULT_ITEMS).filter(visible=True)
    items.first.wait_for(state="visible", timeout=timeout_ms)
    time.sleep(0.5)  # let the list settle
    return [t.strip() for t in items.all_inner_texts()]


def close_search(page, timeout_s: float = 10.0):
    page.keyboard.press("Escape")
    deadline = time.monotonic() + timeout_s
    while page.locator(SEARCH_INPUT).filter(visible=True).count() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)


@pytest.fixture(scope="module")
def page(server, pack_nodes):
    """One headless Chromium session on the server's web UI for all browser tests (the frontend loaded once);
    ``page.ug_errors`` collects the page's script errors after start-up."""
    pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright` "
                                                      "(requirements-dev.txt)")
    if not os.path.isfile(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set UG_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    mappings, _ = pack_nodes
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.set_default_timeout(30000)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url, timeout=60000)
            page.wait_for_function(
                "(types) => window.app && window.app.graph && window.LiteGraph"
                " && types.every(t => t in LiteGraph.registered_node_types)", arg=list(mappings), timeout=90000)
            # Newer frontends greet a new user with the template browser (it lists this pack's example_workflows/);
            # close it. Script errors of the frontend's own start-up are not this pack's (its one extension,
            # web/ug_options_migration.js, runs when a workflow is loaded).
            time.sleep(1.0)
            for text in visible_dialogs(page):
                assert "Template" in text, f"unexpected dialog after loading the page: {text}"
            close_dialogs(page)
            if errors:
                print(f"frontend start-up script errors (ignored): {errors}")
                errors.clear()
            page.ug_errors = errors
            yield page
        finally:
            browser.close()


def load_workflow(page, wf: dict):
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", wf)
    time.sleep(0.3)


def test_browser_finds_nodes_loads_and_runs_image_workflow(server, pack_nodes, page):
    mappings, names = pack_nodes
    info = get(server.url + "object_info", timeout=60)
    wf = wfiles.load(wfiles.path("image.json"))
    set_widgets(wf, info, wfiles.file_changes_ui(wf))
    set_widgets(wf, info, SPEED)
    errors = page.ug_errors
    os.makedirs(SHOTS, exist_ok=True)
    page.evaluate("() => { app.graph.clear(); app.graph.setDirtyCanvas(true, true); }")

    # Node search: the two samplers by title, every node of the pack by its id.
    found = search_results(page, "Universal")
    for node_type in ("UniversalGuidanceKSampler", "UniversalGuidanceSampler"):
        assert any(names[node_type] in t for t in found), (node_type, found)
    close_search(page)
    found = search_results(page, "UniversalGuidance")
    for node_type in mappings:
        assert any(node_type in t or names[node_type] in t for t in found), (node_type, found)
    page.locator(RESULT_ITEMS).filter(visible=True).filter(
        has_text=names["UniversalGuidanceKSampler"]).first.click()
    added = page.evaluate("() => app.graph._nodes.map(n => n.type)")
    assert added == ["UniversalGuidanceKSampler"], added

    # Load the image-guidance workflow (tiny model, small size) and queue it.
    before = set(get(server.url + "history"))
    load_workflow(page, wf)
    loaded = page.evaluate("() => app.graph._nodes.map(n => n.type).sort()")
    assert loaded == sorted(n["type"] for n in wf["nodes"])
    assert visible_dialogs(page) == []
    page.evaluate("() => { app.canvas.ds.scale = 0.6; app.canvas.ds.offset = [20, 120];"
                  " app.canvas.render_canvas_border = false; app.graph.setDirtyCanvas(true, true); }")
    page.evaluate("() => app.queuePrompt(0, 1)")
    entry = wait_for_history(server, before)
    status = entry.get("status", {})
    assert status.get("status_str") == "success" and status.get("completed"), (status, server.log_tail())
    images = entry["outputs"]["7"]["images"]
    assert images and os.path.isfile(os.path.join(server.workdir, "output", images[0]["subfolder"],
                                                  images[0]["filename"]))
    try:  # the result shown in Save Image (the 2024-03 frontend keeps it in node.imgs), for the screenshot
        page.wait_for_function("() => (app.graph.getNodeById(7).imgs || []).length > 0", timeout=15000)
    except Exception:
        pass
    time.sleep(1.0)
    assert visible_dialogs(page) == []
    page.screenshot(path=os.path.join(SHOTS, "page.png"))
    canvas = os.path.join(SHOTS, "canvas.png")
    page.locator("canvas#graph-canvas").screenshot(path=canvas)
    assert not errors, errors
    target = os.path.join(ROOT, "docs", "screenshot.png")
    if not os.path.exists(target) or os.environ.get("UG_UPDATE_SCREENSHOT") == "1":
        from PIL import Image
        Image.open(canvas).convert("RGB").quantize(colors=128).save(target, optimize=True)
    shutil.copyfile(canvas, os.path.join(SHOTS, "canvas-last.png"))


def test_a_workflow_saved_before_the_options_node_opens_with_its_expert_knobs(server, page):
    """The frontend restores widget values by position and drops those without a widget: a file saved while the
    expert knobs were the samplers' last widgets would run with the defaults. web/ug_options_migration.js moves
    them to a UG Sampler Options node linked to the sampler's 'options' input, so the prompt the browser queues
    carries them; a file whose expert values are all defaults gets no options node."""
    errors = page.ug_errors
    data = os.path.join(os.path.dirname(__file__), "data")
    load_workflow(page, wfiles.load(os.path.join(data, "image_workflow_before_options.json")))
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    sampler = output["5"]["inputs"]
    assert isinstance(sampler.get("options"), list), sampler
    options = output[str(sampler["options"][0])]
    assert options["class_type"] == "UniversalGuidanceSamplerOptions", options
    assert options["inputs"] == {"schedule": "linear", "backward_optimizer": "sgd", "backward_early_stop": 0.05,
                                 "jacobian": False, "smoothing": 0.1, "smoothing_samples": 4,
                                 "smoothing_reduction": "logmeanexp", "max_step": 5.0, "cfg_branch": "cond",
                                 "low_memory": "on"}, options
    assert sampler["strength_mode"] == "paper" and sampler["steps"] == 100 and "smoothing" not in sampler, sampler
    load_workflow(page, wfiles.load(os.path.join(data, "image_workflow_v0.1.json")))
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert "options" not in output["5"]["inputs"] and "schedule" not in output["5"]["inputs"], output["5"]
    assert [e["class_type"] for e in output.values()].count("UniversalGuidanceSamplerOptions") == 0
    assert not errors, errors
    page.evaluate("() => { app.graph.clear(); app.graph.setDirtyCanvas(true, true); }")


def wait_for_history(server, before: set) -> dict:
    """The history entry of the first prompt queued after ``before`` was read, once it has finished."""
    deadline, entry = time.monotonic() + RUN_TIMEOUT, None
    while time.monotonic() < deadline:
        new = [k for k in get(server.url + "history") if k not in before]
        if new:
            entry = get(server.url + f"history/{new[0]}")[new[0]]
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str"):
                return entry
        time.sleep(0.5)
    assert entry is not None, f"nothing was queued within {RUN_TIMEOUT} s: {server.log_tail()}"
    return entry


def test_queueing_a_workflow_with_bad_inputs_shows_the_error_dialog(server, page):
    """The frontend's own error dialog, seen by ``visible_dialogs``: image.json with an empty step window
    (start after end) is refused by the server, and the dialog names the problem; closing it leaves none."""
    info = get(server.url + "object_info", timeout=60)
    wf = wfiles.load(wfiles.path("image.json"))
    set_widgets(wf, info, wfiles.file_changes_ui(wf))
    set_widgets(wf, info, {**SPEED, 5: {**SPEED[5], "start_percent": 0.7, "end_percent": 0.3}})
    load_workflow(page, wf)
    assert visible_dialogs(page) == []
    page.evaluate("() => app.queuePrompt(0, 1)")
    deadline, shown = time.monotonic() + 30, []
    while not shown and time.monotonic() < deadline:
        time.sleep(0.3)
        shown = visible_dialogs(page)
    assert shown, "no error dialog on screen after queueing a prompt the server refuses"
    text = " ".join(shown)
    assert "start_percent" in text or "Universal KSampler" in text or "failed validation" in text, text
    close_dialogs(page)


# Workflows pictured in docs/workflows.md (current frontend), rewritten when missing or with UG_UPDATE_SCREENSHOT=1.
WORKFLOW_SHOTS = {"image.json": "workflow-image.png", "self_guidance_move.json": "workflow-self-guidance.png"}


def save_canvas_shot(page, geometry: dict, target: str, scale: float = 0.7, top: int = 50,
                     thumbnail_width: int = 480):
    """The whole graph at ``scale`` (above the frontend's low-detail zoom threshold of 0.6), in a viewport grown
    to hold it, without the minimap and the canvas info, below the workflow tabs; saved as a small PNG, or as a
    ``thumbnail_width`` px wide JPEG for a ``.jpg`` target (the template browser's thumbnail)."""
    if os.path.exists(target) and os.environ.get("UG_UPDATE_SCREENSHOT") != "1":
        return
    from PIL import Image
    boxes = [g["box"] for g in geometry["groups"]] + [
        [n["pos"][0], n["pos"][1] - n["title_h"], max(n["size"][0], n["min"][0]),
         max(n["size"][1], n["min"][1]) + n["title_h"]] for n in geometry["nodes"]]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    width, height = int((x1 - x0) * scale) + 40, int((y1 - y0) * scale) + top + 20
    before = page.viewport_size
    page.set_viewport_size({"width": width + 20, "height": height + 120})  # the zoom toolbar below the crop
    try:
        page.evaluate("""async ([s, ox, oy]) => {
            try { await app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {}
            try { await app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', false); } catch (e) {}
            app.canvas.show_info = false;
            app.canvas.ds.scale = s; app.canvas.ds.offset = [ox, oy]; app.graph.setDirtyCanvas(true, true); }""",
                      [scale, 20 / scale - x0, top / scale - y0])
        time.sleep(1.0)
        raw = os.path.join(SHOTS, os.path.basename(target))
        page.locator("canvas#graph-canvas").screenshot(path=raw)
    finally:
        page.set_viewport_size(before)
    image = Image.open(raw).convert("RGB")
    image = image.crop((0, 0, min(image.width, width), min(image.height, height)))
    if target.endswith(".jpg"):
        image = image.resize((thumbnail_width, round(image.height * thumbnail_width / image.width)), Image.LANCZOS)
        image.save(target, quality=80, optimize=True)
    else:
        image.quantize(colors=64).save(target, optimize=True)


GEOMETRY_JS = """() => {
    const T = LiteGraph.NODE_TITLE_HEIGHT, g = app.graph;
    const nodes = g._nodes.map(n => { const min = n.computeSize();
        return {name: `${n.id} ${n.title || n.type}`, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
                min: [min[0], min[1]], title_h: T}; });
    const ctx = document.createElement('canvas').getContext('2d');
    const groups = (g._groups || g.groups || []).map(gr => { const b = gr._bounding || gr.bounding;
        ctx.font = `${gr.font_size || 24}px ${LiteGraph.GROUP_FONT || 'Arial'}`;
        return {name: gr.title, box: [b[0], b[1], b[2], b[3]], title_w: ctx.measureText(gr.title).width,
                title_h: gr.titleHeight || (gr.font_size || 24) * 1.4}; });
    return {nodes, groups};
}"""


def canvas_layout_problems(geometry: dict) -> list[str]:
    """Overlaps (``ui_build.layout_problems``) of the boxes the frontend draws: a node is drawn at least as
    large as its ``computeSize()`` (its slots and widgets), plus the title bar above ``pos``; and nodes whose
    saved size is smaller than that (their widgets spill out of the node)."""
    from headless.ui_build import layout_problems
    nodes, problems = [], []
    for n in geometry["nodes"]:
        w, h = max(n["size"][0], n["min"][0]), max(n["size"][1], n["min"][1])
        if n["size"][1] + 0.5 < n["min"][1] or n["size"][0] + 0.5 < n["min"][0]:
            problems.append(f"node {n['name']} is saved at {n['size'][0]:.0f}x{n['size'][1]:.0f} but needs "
                            f"{n['min'][0]:.0f}x{n['min'][1]:.0f}")
        nodes.append({"name": n["name"], "box": [n["pos"][0], n["pos"][1] - n["title_h"], w, h + n["title_h"]]})
    for g in geometry["groups"]:
        if g["title_w"] + 8 > g["box"][2]:
            problems.append(f"the title of group {g['name']!r} ({g['title_w']:.0f} px) is wider than the group "
                            f"({g['box'][2]:.0f} px)")
    title_h = max([g["title_h"] for g in geometry["groups"]] or [34])
    return problems + layout_problems(nodes, geometry["groups"], title_h)


def test_every_workflow_loads_in_the_browser_with_nothing_overlapping(server, page):
    """Each example_workflows/*.json as the frontend lays it out (node sizes from the frontend's own computeSize, group
    boxes as loaded): no node covers another node or a group's edge or title, no node is smaller than its
    widgets, no group title is wider than its group, and loading shows no dialog. One browser session for all
    files."""
    info = get(server.url + "object_info", timeout=60)
    report, checked, dump, unavailable = {}, [], {}, []
    for path in wfiles.WORKFLOWS:
        wf = wfiles.load(path)
        if {n["type"] for n in wf["nodes"]} - set(info) - {"Note", "MarkdownNote"}:
            unavailable.append(os.path.basename(path))
            continue  # e.g. SamplerCustomAdvanced or Flux's nodes on the 2024-03 host (tests/test_workflows.py)
        set_widgets(wf, info, wfiles.file_changes_ui(wf))
        load_workflow(page, wf)
        assert visible_dialogs(page) == [], (os.path.basename(path), visible_dialogs(page))
        geometry = page.evaluate(GEOMETRY_JS)
        assert len(geometry["nodes"]) == len(wf["nodes"]) and len(geometry["groups"]) == len(wf["groups"])
        dump[os.path.basename(path)] = geometry
        if page.evaluate("() => !!window.app.extensionManager"):  # pictures of the current frontend only
            shot = WORKFLOW_SHOTS.get(wfiles.key_of(path))
            if shot:
                save_canvas_shot(page, geometry, os.path.join(ROOT, "docs", shot))
            save_canvas_shot(page, geometry, path[:-len(".json")] + ".jpg")  # the template browser's thumbnail
        problems = canvas_layout_problems(geometry)
        if problems:
            report[os.path.basename(path)] = problems
        checked.append(os.path.basename(path))
    os.makedirs(SHOTS, exist_ok=True)
    with open(os.path.join(SHOTS, "workflow-geometry.json"), "w") as f:  # what the frontend drew, for a look
        json.dump(dump, f, indent=1)
    assert len(checked) + len(unavailable) == len(wfiles.WORKFLOWS) and len(checked) >= len(wfiles.WORKFLOWS) - 3, \
        (checked, unavailable)   # at most SamplerCustomAdvanced and the two Flux workflows need a newer host
    assert not report, "\n".join(f"{name}: {p}" for name, problems in report.items() for p in problems)


# What a user types into the node search of the current frontend, and the node that must come first. That search
# (comfyui-frontend-package 1.27) ranks by the node id and display name only: an exact match, then names that
# start with the query, then whole words, then substrings; ties go to nodes used more often (a frequency table of
# core and popular nodes), then to shorter names. The display names are chosen for it.
FIRST_HITS = {"universal": "UniversalGuidanceKSampler", "guidance": "UniversalGuidanceSampler",
              "move object": "UniversalGuidanceSGMove", "resize": "UniversalGuidanceSGResize",
              "CLIP guidance": "UniversalGuidanceCLIPText"}


def test_node_search_of_the_current_frontend_ranks_the_right_node_first(page, pack_nodes):
    if not page.evaluate("() => !!window.app.extensionManager"):
        pytest.skip("the 2024-03 frontend's search box lists matches unranked (substrings of the names)")
    _, names = pack_nodes
    page.evaluate("() => { app.graph.clear(); app.graph.setDirtyCanvas(true, true); }")
    wrong = {}
    for query, node_type in FIRST_HITS.items():
        found = search_results(page, query)
        close_search(page)
        if not found or names[node_type] not in found[0]:
            wrong[query] = (names[node_type], found[:3])
    assert not wrong, wrong


def test_template_browser_lists_the_example_workflows_by_name_with_thumbnails(server):
    """ComfyUI's template browser (v0.3.64: GET /workflow_templates, files under /api/workflow_templates/<pack>/)
    lists this pack's example_workflows/ under their readable file names, once each, and serves each workflow and
    its .jpg thumbnail. Hosts without the route (2024-03) skip."""
    import urllib.parse
    try:
        listed = get(server.url + "workflow_templates")
    except urllib.error.HTTPError as e:
        pytest.skip(f"this ComfyUI has no template browser route ({e.code})")
    names = sorted(os.path.basename(p)[:-len(".json")] for p in wfiles.WORKFLOWS)
    ours = [templates for templates in listed.values() if set(templates) & set(names)]
    assert len(ours) == 1 and sorted(ours[0]) == names, (listed, names)
    module = next(m for m, templates in listed.items() if templates is ours[0])
    for name in names:
        base = server.url + f"api/workflow_templates/{urllib.parse.quote(module)}/{urllib.parse.quote(name)}"
        with urllib.request.urlopen(base + ".json", timeout=10) as r:
            assert json.loads(r.read())["nodes"], name
        with urllib.request.urlopen(base + ".jpg", timeout=10) as r:
            data = r.read()
            assert data[:3] == b"\xff\xd8\xff" and len(data) < 100_000, (name, len(data))
