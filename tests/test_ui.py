"""`fl2t ui`: the web app, driven in a real headless Chromium (Debian's chromium and chromium-driver, never a
downloaded one), and its actions and launch without a browser.

`make screenshots` runs the browser test with FL2T_UI_SCREENSHOTS=docs: the same steps, on the tiny world's base
model and one of its concepts, saving a picture of each tab as docs/ui-<tab>.png (the Benchmark tab shows the run
folder FL2T_UI_BENCH_RUN, by default runs/demo, when it exists). A plain test run writes nothing into the checkout.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from fl2t.errors import Fl2tError
from fl2t.library import Library

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = os.environ.get("FL2T_UI_SCREENSHOTS")  # a folder: save a picture of each tab there
# A few steps of everything: the browser test must stay within a couple of minutes on two CPU cores.
SETTINGS = """\
learn:
  lr: 1.0e-4
  embedding_lr: 3.0e-2
  num_anchors: 2
  anchor_steps: 2
  checkpoint_every: 0
consolidate:
  steps: 4
  batch_size: 4
"""
# For the screenshots: the tiny world's base, enough steps for the concept to show.
SCREENSHOT_SETTINGS = """\
learn:
  num_anchors: 4
  anchor_steps: 12
consolidate:
  steps: 30
"""


def need_browser() -> None:
    """Skip without Chromium and its driver, except in CI, where their absence is a failure."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[ui,test]')")
    if missing:
        reason = (
            f"no headless browser for the UI test: {', '.join(missing)} missing "
            "(apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(library: Path, base: Path | None, config: Path, tmp: Path) -> Iterator[str]:
    """`fl2t ui` in a subprocess on a free port of 127.0.0.1; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        "XDG_CACHE_HOME": str(tmp / "cache"),
        "TMPDIR": str(tmp),  # exports and uploads stay in the test's folder
        "HF_HUB_OFFLINE": "1",
        # The server, the browser and the test share the cores: torch's spinning worker threads slow each
        # other down many times over on a busy machine, one thread each does not.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    args = ["ui", "--library", library, "--port", port, "--config", config, *(["--base", base] if base else [])]
    log = tmp / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fl2t.cli", *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fl2t ui exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"fl2t ui did not answer on {url}:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # the server's log says where it listened, and warns about nothing on 127.0.0.1
    assert "warning" not in log.read_text().lower(), log.read_text()


class Page:
    """The app in Chromium, by the elem_ids the app gives its elements."""

    def __init__(self, url: str, shots: Path | None):
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.url, self.shots = url, shots
        self.open()

    def open(self) -> None:
        self.driver.get(self.url)
        self.wait(lambda: self.driver.find_elements("css selector", "button[role=tab]"), "the tabs", 60)

    def quit(self) -> None:
        self.driver.quit()

    def requests_elsewhere(self) -> list[str]:
        """The URLs the page asked for from anywhere but the app's own server (fonts, analytics, ...)."""
        urls = []
        for entry in self.driver.get_log("performance"):
            event = json.loads(entry["message"])["message"]
            if event["method"] == "Network.requestWillBeSent":
                urls.append(event["params"]["request"]["url"])
        return [u for u in urls if not u.startswith((self.url, "data:", "blob:"))]

    def wait(self, condition: Callable[[], object], what: str, timeout: float = 60) -> object:
        from selenium.common.exceptions import WebDriverException

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = condition()
            except WebDriverException:  # an element re-rendered between finding and reading it: look again
                value = None
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"waited {timeout:.0f} s for {what}; page text:\n{self.text('tabs')}")

    def tab(self, name: str) -> None:
        buttons = self.driver.find_elements("css selector", "button[role=tab]")
        next(b for b in buttons if b.text.strip() == name).click()
        time.sleep(0.5)

    def find(self, elem_id: str, css: str = ""):
        """The element #elem_id, or the first one inside it matching any of the comma-separated `css`."""
        selector = ", ".join(f"#{elem_id} {c.strip()}".strip() for c in css.split(","))
        return self.driver.find_element("css selector", selector)

    def exists(self, elem_id: str) -> bool:
        return bool(self.driver.find_elements("id", elem_id))

    def text(self, elem_id: str) -> str:
        found = self.driver.find_elements("id", elem_id)
        return found[0].text if found else ""

    def click(self, elem_id: str) -> None:
        self.wait(lambda: self.find(elem_id).is_displayed(), f"#{elem_id}")
        self.find(elem_id).click()

    def type(self, elem_id: str, text: str) -> None:
        box = self.find(elem_id, "textarea, input")
        box.clear()
        box.send_keys(text)

    def set_number(self, elem_id: str, value: int | float) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(elem_id, "input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    def upload(self, elem_id: str, paths: list[Path]) -> None:
        self.find(elem_id, "input[type=file]").send_keys("\n".join(str(p) for p in paths))
        names = [p.stem for p in paths]  # the page shows a name's stem and suffix apart
        self.wait(lambda: all(n in self.text(elem_id) for n in names), f"{names} uploaded")

    def images(self, elem_id: str) -> int:
        return len(self.driver.find_elements("css selector", f"#{elem_id} img"))

    def shot(self, name: str) -> None:
        if self.shots:
            time.sleep(1)
            self.driver.save_screenshot(str(self.shots / f"ui-{name}.png"))


def _library_state(path: Path) -> tuple[list[str], bytes | None]:
    manifest = path / "library.json"
    return (Library(path).names() if manifest.exists() else [], manifest.read_bytes() if manifest.exists() else None)


@contextmanager
def lock_held(library: Path) -> Iterator[None]:
    """Another process writing the library, as far as fl2t can tell: its lock is taken."""
    fd = os.open(library / ".lock", os.O_CREAT | os.O_WRONLY, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_browser_learn_generate_forget_and_bad_input(tmp_path, tiny_base, concepts_root):
    """From an empty library to a learned concept and a generated image, in the browser alone."""
    need_browser()
    from gradio_client import Client

    shots = Path(SCREENSHOTS).resolve() if SCREENSHOTS else None
    if shots:  # the tiny world's base (the default) and one of its concepts, so the pictures show something
        from fl2t.world import write_concepts

        base, folder = None, next(p for p in write_concepts(tmp_path / "world") if p.name == "stripestar")
        name, class_word, settings, steps = "stripestar", "star", SCREENSHOT_SETTINGS, 400
        shots.mkdir(parents=True, exist_ok=True)
    else:
        base, folder = tiny_base, concepts_root / "c-stripeball"
        name, class_word, settings, steps = "c-stripeball", "ball", SETTINGS, 4
    images = sorted(folder.glob("*.png"))[:3]
    config = tmp_path / "settings.yaml"
    config.write_text(settings)
    lib = tmp_path / "library"
    token = f"<{name}>"

    with serve(lib, base, config, tmp_path) as url:
        page = Page(url, shots)
        try:
            # a first start: the library is empty and the page says how to add a concept, with examples
            page.wait(lambda: page.exists("library-empty"), "the empty library's help")
            assert "drop 3" in page.text("library-empty")
            page.click("example-use")  # the tiny world's first concept, as an example: it fills the Learn tab
            page.wait(
                lambda: "stripestar" in page.find("learn-folder", "textarea").get_attribute("value"), "the example"
            )
            assert (Path(page.find("learn-folder", "textarea").get_attribute("value")) / "concept.yaml").is_file()

            page.open()

            # bad input: a text file named .png among the images; the page says which and nothing is written
            bad = tmp_path / "upload" / "notes.png"
            bad.parent.mkdir()
            bad.write_text("not a picture")
            page.tab("Learn")
            page.upload("learn-files", [*images[:2], bad])
            page.type("learn-name", name)
            page.click("learn-button")
            page.wait(lambda: "notes.png: not a readable image" in page.text("learn-message"), "the bad-file message")
            assert _library_state(lib) == ([], None)

            # three images, a name and a class word; a long learn is cancelled and leaves the library as it was
            page.open()
            page.tab("Learn")
            page.upload("learn-files", images)
            page.type("learn-name", name)
            page.type("learn-class", class_word)
            page.set_number("learn-steps", 100000)
            page.click("learn-button")
            page.wait(lambda: "Step 1" in page.text("learn-status"), "Step 1 to start", 120)
            page.click("learn-cancel")
            page.wait(lambda: "Cancelled" in page.text("learn-message"), "the cancel", 120)
            assert _library_state(lib)[0] == []

            # learn, with live progress of Step 1 and Step 2
            page.set_number("learn-steps", steps)
            page.click("learn-button")
            page.wait(lambda: "Cancelled" not in page.text("learn-message"), "the new learn to start")
            # meanwhile another person asks for an image: the queue runs it after the learn, on the new library
            client = Client(url, download_files=False, verbose=False, analytics_enabled=False)
            waiting = client.submit(f"a photo of {token} {class_word}", 0, 2, 7.5, 1, api_name="/generate")
            stages: set[str] = set()

            def learned() -> bool:
                progress = page.text("learn-status")
                stages.update(s for s in ("Step 1", "Step 2") if s in progress)
                message = page.text("learn-message")
                assert "error" not in message.lower() and "cancel" not in message.lower(), message
                return f"Learned {name}" in message

            page.wait(learned, "the learn to finish", timeout=600 if shots else 300)
            assert "Fidelity gate: passed" in page.text("learn-message")
            assert stages == {"Step 1", "Step 2"}, f"progress never showed {sorted({'Step 1', 'Step 2'} - stages)}"
            page.wait(lambda: page.images("learn-samples") >= 3, "step-0, Step-1 and Step-2 samples")
            page.shot("learn")
            gallery, *_, message = waiting.result(timeout=300)
            assert len(gallery) == 1 and not message, message
            assert Library(lib).names() == [name] and not Library(lib).check()

            # the card, with the concept's thumbnails and token
            page.tab("Library")
            page.wait(lambda: page.exists(f"card-{name}"), "the new card")
            card = page.text(f"card-{name}")
            assert token in card and class_word in card and page.images(f"card-{name}") >= 3
            assert f"fidelity {Library(lib).fidelity()[name]:.3f}" in card, card  # measured by the learn's Step 2
            page.click(f"export-kohya-{name}")  # a zip for AUTOMATIC1111 and ComfyUI, offered for download
            page.wait(lambda: f"{name}-kohya" in page.text(f"export-file-{name}"), "the export's download")
            page.click(f"samples-{name}")
            page.wait(lambda: page.images(f"samples-gallery-{name}") >= 1, "the expert's samples")
            page.shot("library")

            # generate with the token from its button: an image, the heat map, consolidated vs expert alone
            page.tab("Generate")
            page.type("gen-prompt", "a photo of")
            page.click(f"insert-{name}")
            page.wait(lambda: token in page.find("gen-prompt", "textarea").get_attribute("value"), "the token inserted")
            page.set_number("gen-steps", 12 if shots else 2)
            page.set_number("gen-n", 2)
            page.click("gen-button")
            page.wait(lambda: page.images("gen-gallery") >= 2, "two images in the gallery", 180)
            page.wait(lambda: page.images("gen-heatmap") >= 1, "the relevance heat map")
            page.wait(lambda: page.images("gen-compare") >= 2, "consolidated vs expert alone")
            assert not page.text("gen-message")
            page.shot("generate")

            # two people generating at once: the queue runs both
            jobs = [
                client.submit(f"a photo of {token} {class_word}", s, 2, 7.5, 1, api_name="/generate") for s in (1, 2)
            ]
            for job in jobs:
                gallery, *_, message = job.result(timeout=300)
                assert len(gallery) == 1 and not message, message

            # forgetting asks first; while another process writes the library, it says so and changes nothing
            page.tab("Library")
            before = _library_state(lib)
            with lock_held(lib):
                page.click(f"forget-{name}")
                page.click(f"forget-yes-{name}")
                page.wait(lambda: "another fl2t process is writing" in page.text("library-message"), "the lock message")
            assert _library_state(lib) == before and page.exists(f"card-{name}")
            page.click(f"forget-{name}")
            page.click(f"forget-yes-{name}")
            page.wait(lambda: not page.exists(f"card-{name}") and page.exists("library-empty"), "the card gone", 120)
            assert f"Forgot {name}" in page.text("library-message") and Library(lib).names() == []
            assert page.requests_elsewhere() == []  # the page fetched nothing from outside the machine

            run = Path(os.environ.get("FL2T_UI_BENCH_RUN", "runs/demo")).resolve()
            if shots and (run / "results.json").is_file():  # a run the test does not make: the demo's, by default
                page.tab("Benchmark")
                page.type("bench-folder", str(run))
                page.click("bench-open")
                page.wait(lambda: page.images("bench-plots") and page.images("bench-grids"), "the run's plots", 120)
                page.shot("benchmark")
        finally:
            page.quit()


# -- without a browser -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, learned_library, tiny_base):
    """A workspace on a copy of a one-concept library, with its cache in a temporary folder."""
    from fl2t.ui.actions import Workspace

    tmp = tmp_path_factory.mktemp("ui")
    shutil.copytree(learned_library, tmp / "library")
    (tmp / "settings.yaml").write_text(SETTINGS)
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    try:
        yield Workspace(tmp / "library", base=str(tiny_base), config=tmp / "settings.yaml")
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = old


def _bad_images(tmp: Path, good: list[Path], kind: str) -> tuple[list[Path], dict]:
    folder = tmp / kind
    folder.mkdir()
    if kind == "text-as-png":
        (folder / "notes.png").write_text("not a picture")
        return [*good[:2], folder / "notes.png"], {"name": "c-new"}
    if kind == "one-image":
        return good[:1], {"name": "c-new"}
    if kind == "duplicate-token":
        return good, {"name": "c-new", "tokens": "<c-stripeball>"}
    return good, {"name": "my/dog"}  # a name with a slash


@pytest.mark.parametrize(
    "kind, says",
    [
        ("text-as-png", "notes.png: not a readable image"),
        ("one-image", "found 1 image"),
        ("duplicate-token", "token '<c-stripeball>' belongs to concept 'c-stripeball'"),
        ("name-with-slash", "concept name 'my/dog' is not allowed"),
    ],
)
def test_bad_input_is_refused_with_a_message_before_anything_runs(kind, says, workspace, concepts_root, tmp_path):
    good = sorted((concepts_root / "c-checkbox").glob("*.png"))
    uploads, form = _bad_images(tmp_path, good, kind)
    before = _library_state(workspace.library)
    with pytest.raises(Fl2tError, match=says.replace("(", r"\(")) as e:
        workspace.start_learn(uploads, None, **form)
    assert str(workspace.cache) not in str(e.value)  # the page names the files, not where the app staged them
    assert workspace.job is None and _library_state(workspace.library) == before


def test_card_shows_the_concept_and_its_expert_samples(workspace):
    (card,) = workspace.cards()
    assert (card.name, card.tokens, card.class_word, card.kind) == (
        "c-stripeball",
        ["<c-stripeball>"],
        "ball",
        "object",
    )
    assert card.thumbnails_are == "expert samples" and len(card.thumbnails) == 2  # learned outside the app
    assert card.fidelity is None  # never consolidated: nothing measured
    assert all(max(im.size) == 96 for im in card.thumbnails)


def test_export_zip_holds_the_kohya_files(workspace):
    import zipfile

    archive = workspace.export_zip("c-stripeball", "kohya")
    names = zipfile.ZipFile(archive).namelist()
    assert "c-stripeball-kohya/c-stripeball.safetensors" in names
    assert "c-stripeball-kohya/embeddings/c-stripeball.safetensors" in names
    with pytest.raises(Fl2tError, match="diffusers, kohya"):
        workspace.export_zip("c-stripeball", "ckpt")
    again = workspace.export_zip("c-stripeball", "diffusers")
    assert "c-stripeball-diffusers/pytorch_lora_weights.safetensors" in zipfile.ZipFile(again).namelist()
    assert not archive.exists()  # one export's folder at a time in the temp dir
    shutil.rmtree(again.parent)


def test_benchmark_tab_reads_a_run_folder(workspace, tmp_path):
    run = tmp_path / "run"
    (run / "fl2t" / "order0" / "grids").mkdir(parents=True)
    Image.new("RGB", (20, 10), (200, 0, 0)).save(run / "fl2t" / "order0" / "grids" / "c-a.png")
    R = {"nia": [[0.9, None], [0.8, 0.7]], "ca": [[1.0, None], [0.5, 1.0]]}
    method = {
        "runs": [{"R": R}],
        "per_concept": {"c-a": {"nia": 0.8}, "c-b": {"nia": 0.7}},
        "average": {"nia": 0.75, "ia": 0.6, "ta": 0.3, "dino": 0.5, "ca": 0.75},
        "forgetting": {"nia": 0.1, "ca": 0.5},
        "multi": None,
        "order_spread": 0.0,
    }
    (run / "results.json").write_text(
        json.dumps({"name": "t", "concepts": ["c-a", "c-b"], "orders": [[0, 1]], "methods": {"fl2t": method}})
    )
    header, rows, figures, grids = workspace.open_benchmark(run)
    assert header[:3] == ["method", "V1 c-a", "V2 c-b"] and rows[0][:3] == ["fl2t", "0.80", "0.70"]
    assert [c for _, c in figures] == ["forgetting", "R-fl2t"] and [c for _, c in grids] == ["fl2t · c-a"]
    with pytest.raises(Fl2tError, match="no results.json"):
        workspace.open_benchmark(tmp_path / "nothing")


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_ui_binds_to_localhost_unless_asked_and_warns_otherwise(host, warns, tmp_path, tiny_base, monkeypatch):
    import gradio as gr

    from fl2t.ui import launch

    served: dict = {}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: served.update(kw))
    said: list[str] = []
    launch(tmp_path / "library", base=str(tiny_base), host=host, port=7999, say=said.append)
    assert (served["server_name"], served["server_port"], served["share"]) == (host, 7999, False)
    assert any(s.startswith("warning: serving on 0.0.0.0") for s in said) == warns
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_a_consolidation_the_gate_refused_can_be_made_current(tmp_path, consolidated_library, monkeypatch):
    from fl2t.ui.actions import Workspace

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shutil.copytree(consolidated_library, tmp_path / "library")
    lib = Library(tmp_path / "library")
    current = lib.manifest().version

    # a consolidation the regression gate kept as a candidate (the same model, its own fidelity record)
    def same_model(folder: Path) -> None:
        shutil.copytree(lib.consolidated_dir(), folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("files.json"))

    lib.save_consolidated(same_model, fidelity={n: 0.5 for n in lib.names()}, candidate=True)
    candidate = lib.manifest().latest
    assert candidate != current and lib.manifest().version == current

    ws = Workspace(lib.path)
    ws.make_current(candidate)
    assert Library(lib.path).manifest().version == candidate and not Library(lib.path).check()
    assert [c.fidelity for c in ws.cards()] == [0.5] * len(lib.names())
