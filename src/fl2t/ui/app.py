"""The page: four tabs (Library, Learn, Generate, Benchmark) laid out with Gradio, each event calling one action
of `fl2t.ui.actions.Workspace`. Work that uses the model or writes the library runs in one queue ("work"), one
request at a time; cancelling a learn and reading the library do not wait in it.

Every element a test or a person's script looks for has an `elem_id`: `card-<name>`, `forget-<name>`,
`learn-files`, `learn-message`, `gen-gallery`, ... (see `build_app`).
"""

from __future__ import annotations

import base64
import html
import io
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
from PIL import Image

from fl2t.errors import Fl2tError
from fl2t.ui.actions import Card, LearnJob, Workspace, png_bytes
from fl2t.world import CONCEPTS

WORK = "work"  # the queue of everything that runs a model or writes the library: one at a time
CSS = """
.fl2t-thumbs img { display: inline-block; margin: 2px; border-radius: 4px; }
.fl2t-card-box { max-width: 440px; }
.fl2t-error { color: #b00020; font-weight: 600; }
.fl2t-ok { color: #1b5e20; font-weight: 600; }
.fl2t-meta { font-size: 0.9em; color: #555; }
progress { width: 24em; vertical-align: middle; }
/* the tiny world's pictures are 32 pixels a side: enlarge them without blurring */
.fl2t-thumbs img, .fl2t-pixels img { image-rendering: pixelated; }
"""


# -- small HTML pieces (every text from the library or the user is escaped: tokens look like <tags>) ------------
def message(text: str = "", ok: bool = False) -> str:
    if not text:
        return ""
    cls = "fl2t-ok" if ok else "fl2t-error"
    return f"<div class='{cls}'>{html.escape(text)}</div>"


def error_message(e: Exception) -> str:
    if isinstance(e, Fl2tError):
        return message(str(e))
    traceback.print_exc()
    return message(f"internal error: {type(e).__name__}: {e}")


def _img(im: Image.Image, title: str = "") -> str:
    data = base64.b64encode(png_bytes(im)).decode()
    return f"<img src='data:image/png;base64,{data}' title='{html.escape(title)}' alt='{html.escape(title)}'>"


def card_html(c: Card) -> str:
    tokens = " ".join(c.tokens)
    steps = f", {c.steps} steps" if c.steps else ""
    fidelity = (
        "fidelity: not measured" if c.fidelity is None else f"fidelity {c.fidelity:.3f} in the consolidated library"
    )
    return (
        f"<div class='fl2t-card'><h3>{html.escape(c.name)}</h3>"
        f"<div class='fl2t-thumbs'>{''.join(_img(im, c.thumbnails_are) for im in c.thumbnails)}</div>"
        f"<div class='fl2t-meta'>{html.escape(c.thumbnails_are)}</div>"
        f"<p>token <code>{html.escape(tokens)}</code> · class <b>{html.escape(c.class_word)}</b> · "
        f"{html.escape(c.kind)}<br>prompt with <code>{html.escape(c.subject)}</code><br>"
        f"learned {html.escape(c.learned)} (rank {c.rank}{steps})<br>"
        f"<span class='fl2t-meta'>{html.escape(fidelity)}</span></p></div>"
    )


def empty_library_html(ws: Workspace) -> str:
    return (
        f"<div id='library-empty'><h3>No concepts in {html.escape(str(ws.library))} yet</h3>"
        "<p>To add one: open <b>Learn</b>, drop 3–20 pictures of one subject (your dog, a toy, a painting style), "
        "give it a name and a class word (<i>dog</i>), and press <b>Learn</b>. "
        "Or take one of the tiny world's concepts as an example:</p></div>"
    )


def status_html(job: LearnJob | None) -> str:
    if job is None:
        return ""
    p = job.progress
    elapsed = time.monotonic() - p.started
    parts = [f"<b>{html.escape(p.stage)}</b>"]
    if p.total > 1:
        parts.append(f"<progress value='{p.done}' max='{p.total}'></progress> {p.done}/{p.total} steps")
    parts.append(f"{elapsed:.0f} s")
    if p.eta is not None:
        parts.append(f"about {p.eta:.0f} s left")
    if p.info:
        parts.append(html.escape(p.info))
    if job.finished.is_set():
        parts = ["<b>done</b>" if job.error is None else "<b>stopped</b>"]
    return "<div id='learn-progress'>" + " · ".join(parts) + "</div>"


def heatmap(blocks: list[str], columns: list[str], rows: list[list[float]], prompt: str) -> Image.Image:
    """The prompt's weight per concept (columns) and UNet block (rows), as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 2.4 + 1.1 * len(columns)), 1.2 + 0.42 * len(blocks)))
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), blocks, fontsize=8)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_title(f"relevance per concept and UNet block\n{prompt[:60]}", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


# -- the app ------------------------------------------------------------------------------------------------
def build_app(ws: Workspace) -> gr.Blocks:
    """The whole page for one workspace (library + base)."""
    with gr.Blocks(title="fl2t", analytics_enabled=False) as app:
        version = gr.State(0)  # bumped when this page changed the library: cards and token buttons re-render
        gr.HTML(_header(ws), elem_id="header")
        form = LearnForm(ws)  # made here, placed on the Learn tab: the Library tab's example button fills it
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Library", id="library", elem_id="tab-library"):
                library_tab_ui(ws, version, tabs, form)
            with gr.Tab("Learn", id="learn", elem_id="tab-learn"):
                learn_tab_ui(ws, version, form)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate_tab_ui(ws, version)
            with gr.Tab("Benchmark", id="benchmark", elem_id="tab-benchmark"):
                benchmark_tab_ui(ws)
    return app


def _header(ws: Workspace) -> str:
    try:
        base = ws.base_id()
    except Fl2tError as e:
        base = str(e)
    return (
        f"<h2>fl2t</h2><p>library <code>{html.escape(str(ws.library))}</code> · base <code>{html.escape(base)}</code>"
        f" · {html.escape(ws.device)}</p>"
    )


def library_tab_ui(ws: Workspace, version: gr.State, tabs: gr.Tabs, form: LearnForm) -> None:
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="library-refresh", scale=0)
    lib_message = gr.HTML(elem_id="library-message")
    refresh.click(lambda v: v + 1, version, version, concurrency_limit=None)

    @gr.render(inputs=version)
    def cards(_: int) -> None:
        try:
            all_cards = ws.cards()
        except Exception as e:  # a damaged library: say so in the page
            gr.HTML(error_message(e), elem_id="library-error")
            return
        if not all_cards:
            gr.HTML(empty_library_html(ws))
            with gr.Row():
                example = gr.Dropdown(
                    [c.name for c in CONCEPTS],
                    value=CONCEPTS[0].name,
                    label="Example concept",
                    elem_id="example-concept",
                    scale=2,
                )
                use = gr.Button("Use this example", elem_id="example-use", scale=1)
            use.click(
                lambda n: (str(ws.example_folder(n)), "", gr.Tabs(selected="learn")),
                example,
                [form.folder, form.name, tabs],
                concurrency_limit=None,
            )
            return
        with gr.Row(equal_height=False):
            for c in all_cards:
                with gr.Column(elem_id=f"card-{c.name}", elem_classes="fl2t-card-box", scale=0, min_width=340):
                    gr.HTML(card_html(c))
                    with gr.Row():
                        forget = gr.Button("Forget", size="sm", variant="stop", elem_id=f"forget-{c.name}")
                        samples = gr.Button("Expert samples", size="sm", elem_id=f"samples-{c.name}")
                    with gr.Row():
                        export_d = gr.Button("Export diffusers", size="sm", elem_id=f"export-diffusers-{c.name}")
                        export_k = gr.Button("Export kohya", size="sm", elem_id=f"export-kohya-{c.name}")
                    with gr.Row(visible=False) as confirm_row:
                        gr.HTML(f"<b>Forget {html.escape(c.name)}?</b> The library re-consolidates without it.")
                        yes = gr.Button("Yes, forget it", size="sm", variant="stop", elem_id=f"forget-yes-{c.name}")
                        no = gr.Button("Keep it", size="sm", elem_id=f"forget-no-{c.name}")
                    download = gr.File(label="Export", visible=False, elem_id=f"export-file-{c.name}")
                    gallery = gr.Gallery(
                        label="Expert alone",
                        visible=False,
                        columns=4,
                        height=220,
                        object_fit="contain",
                        elem_classes="fl2t-pixels",
                        elem_id=f"samples-gallery-{c.name}",
                    )
                forget.click(lambda: gr.Row(visible=True), None, confirm_row, concurrency_limit=None)
                no.click(lambda: gr.Row(visible=False), None, confirm_row, concurrency_limit=None)
                yes.click(_forget(ws, c.name), version, [lib_message, version], concurrency_id=WORK)
                for button, fmt in ((export_d, "diffusers"), (export_k, "kohya")):
                    button.click(_export(ws, c.name, fmt), None, [download, lib_message], concurrency_id=WORK)
                samples.click(_samples(ws, c.name), None, [gallery, lib_message], concurrency_id=WORK)


def _forget(ws: Workspace, name: str) -> Callable[[int], tuple[str, int]]:
    def run(v: int) -> tuple[str, int]:
        try:
            ws.forget(name)
        except Exception as e:
            return error_message(e), v
        return message(f"Forgot {name}.", ok=True), v + 1

    return run


def _export(ws: Workspace, name: str, fmt: str) -> Callable[[], tuple[Any, str]]:
    def run() -> tuple[Any, str]:
        try:
            path = ws.export_zip(name, fmt)
        except Exception as e:
            return gr.File(visible=False), error_message(e)
        return gr.File(value=str(path), visible=True), message(f"Exported {name} ({fmt}): {path.name}", ok=True)

    return run


def _samples(ws: Workspace, name: str) -> Callable[[], tuple[Any, str]]:
    def run() -> tuple[Any, str]:
        try:
            return gr.Gallery(value=ws.expert_samples(name), visible=True), ""
        except Exception as e:
            return gr.Gallery(visible=False), error_message(e)

    return run


class LearnForm:
    """The Learn tab's inputs, made unrendered so that other tabs can fill them before the tab places them."""

    def __init__(self, ws: Workspace):
        s = ws.settings
        self.files = gr.File(
            label="Reference images: 3-20 pictures of one subject (png, jpg, webp; captions as .txt)",
            file_count="multiple",
            elem_id="learn-files",
            render=False,
        )
        self.folder = gr.Textbox(
            label="... or a concept folder on this machine",
            placeholder="/path/to/my-dog",
            elem_id="learn-folder",
            render=False,
        )
        self.name = gr.Textbox(
            label="Name", placeholder="my-dog (default: the folder's)", elem_id="learn-name", render=False
        )
        self.tokens = gr.Textbox(
            label="Token(s)", placeholder="<my-dog> (default: <name>)", elem_id="learn-tokens", render=False
        )
        self.class_word = gr.Textbox(label="Class word", placeholder="dog", elem_id="learn-class", render=False)
        self.kind = gr.Radio(
            ["object", "style"], label="Kind (default: the folder's, or object)", elem_id="learn-kind", render=False
        )
        self.steps = gr.Number(
            s.learn.steps, label="Step 1 steps", precision=0, minimum=1, elem_id="learn-steps", render=False
        )
        self.consolidate_steps = gr.Number(
            s.consolidate.steps,
            label="Step 2 steps",
            precision=0,
            minimum=1,
            elem_id="learn-consolidate-steps",
            visible=s.consolidate.relevance == "learned",  # the default token lookup trains nothing
            render=False,
        )

    @property
    def inputs(self) -> list[Any]:
        return [
            self.files,
            self.folder,
            self.name,
            self.tokens,
            self.class_word,
            self.kind,
            self.steps,
            self.consolidate_steps,
        ]


def learn_tab_ui(ws: Workspace, version: gr.State, form: LearnForm) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            form.files.render()
            form.folder.render()
        with gr.Column(scale=2):
            form.name.render()
            form.tokens.render()
            form.class_word.render()
            form.kind.render()
            with gr.Row():
                form.steps.render()
                form.consolidate_steps.render()
    with gr.Row():
        start = gr.Button("Learn", variant="primary", elem_id="learn-button")
        cancel = gr.Button("Cancel", variant="stop", elem_id="learn-cancel")
    # After the fidelity gate refused the new consolidation: the person may take it anyway.
    accept = gr.Button("Use the new consolidation anyway", visible=False, elem_id="learn-accept")
    status = gr.HTML(elem_id="learn-status")
    learn_message = gr.HTML(elem_id="learn-message")
    samples = gr.Gallery(
        label="Samples: step 0 (before training), after Step 1, after Step 2",
        columns=4,
        height=260,
        object_fit="contain",
        elem_classes="fl2t-pixels",
        elem_id="learn-samples",
    )

    def run(
        files: list[str] | None,
        folder: str,
        name: str,
        tokens: str,
        class_word: str,
        kind: str | None,
        steps: float | None,
        consolidate_steps: float | None,
        v: int,
    ) -> Iterator[tuple[str, Any, str, int, Any]]:
        try:
            job = ws.start_learn(
                files,
                folder,
                name=name,
                tokens=tokens,
                class_word=class_word,
                kind=kind,
                steps=int(steps) if steps else None,
                consolidate_steps=int(consolidate_steps) if consolidate_steps else None,
            )
        except Exception as e:
            yield "", [], error_message(e), v, gr.skip()
            return
        yield status_html(job), [], message("Learning...", ok=True), v, gr.Button(visible=False)
        shown = 0
        for _ in job.updates():  # the gallery is sent again only when a sample was added
            samples = list(job.samples)
            yield status_html(job), samples if len(samples) != shown else gr.skip(), gr.skip(), v, gr.skip()
            shown = len(samples)
        if job.error is not None:  # the version moves anyway: a cancel may have come after Step 1's card
            yield (
                status_html(job),
                list(job.samples),
                message(job.error),
                v + 1,
                gr.Button(visible=job.candidate is not None),
            )
            return
        learned = job.learned
        assert learned is not None
        text = (
            f"Learned {learned.name} ({' '.join(learned.tokens)}) into the library. Its card is on the Library "
            f"tab; use its token on the Generate tab. {(job.gate or '')[:1].upper()}{(job.gate or '')[1:]}"
        )
        yield status_html(job), list(job.samples), message(text, ok=True), v + 1, gr.skip()

    def take_candidate(v: int) -> tuple[str, int, Any]:
        job = ws.job
        if job is None or job.candidate is None:
            return message("No refused consolidation to take."), v, gr.Button(visible=False)
        try:
            ws.make_current(job.candidate)
        except Exception as e:
            return error_message(e), v, gr.skip()
        text = f"Version {job.candidate} is current: the library generates with the new consolidation."
        job.candidate = None
        return message(text, ok=True), v + 1, gr.Button(visible=False)

    start.click(
        run,
        [*form.inputs, version],
        [status, samples, learn_message, version, accept],
        concurrency_id=WORK,
    )
    accept.click(take_candidate, version, [learn_message, version, accept], concurrency_id=WORK)
    cancel.click(
        lambda: message(
            "Cancelling: the library will be as it was." if ws.cancel_learning() else "Nothing is being learned.",
            ok=True,
        ),
        None,
        learn_message,
        concurrency_limit=None,
    )


def generate_tab_ui(ws: Workspace, version: gr.State) -> None:
    prompt = gr.Textbox(label="Prompt", placeholder="a photo of <my-dog> dog on a beach", elem_id="gen-prompt")

    @gr.render(inputs=version)
    def token_buttons(_: int) -> None:
        try:
            cards = ws.cards()
        except Exception:
            cards = []
        with gr.Row(elem_id="gen-tokens"):
            if not cards:
                gr.HTML("<i>No concepts yet: learn one on the Learn tab.</i>")
            for c in cards:
                b = gr.Button(c.subject, size="sm", elem_id=f"insert-{c.name}")
                b.click(lambda p, s=c.subject: f"{p.rstrip()} {s}".strip(), prompt, prompt, concurrency_limit=None)

    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0, elem_id="gen-seed")
        steps = gr.Number(30, label="Steps", precision=0, minimum=1, elem_id="gen-steps")
        guidance = gr.Number(7.5, label="Guidance", minimum=0, elem_id="gen-guidance")
        n = gr.Number(1, label="Images", precision=0, minimum=1, maximum=16, elem_id="gen-n")
    go = gr.Button("Generate", variant="primary", elem_id="gen-button")
    gen_message = gr.HTML(elem_id="gen-message")
    with gr.Row():
        gallery = gr.Gallery(
            label="Consolidated library",
            columns=2,
            height=360,
            object_fit="contain",
            elem_classes="fl2t-pixels",
            elem_id="gen-gallery",
            scale=3,
        )
        heat = gr.Image(
            label="Which concepts the prompt selects", show_label=False, type="pil", elem_id="gen-heatmap", scale=2
        )
    compare = gr.Gallery(
        label="Consolidated vs expert alone (same seed)",
        columns=2,
        height=260,
        visible=False,
        object_fit="contain",
        elem_classes="fl2t-pixels",
        elem_id="gen-compare",
    )

    def run(p: str, seed_: float, steps_: float, guidance_: float, n_: float) -> tuple[Any, Any, Any, str]:
        try:
            kw = dict(seed=int(seed_ or 0), steps=int(steps_ or 30), guidance=float(guidance_), n=int(n_ or 1))
            images = ws.generate_images(p, **kw)  # type: ignore[arg-type]
            blocks, columns, rows = ws.relevance(p)
            named = ws.named_concepts(p)
            side_by_side = gr.Gallery(visible=False)
            if len(named) == 1:  # one concept: the consolidated image beside its expert's, same seed
                alone = ws.generate_images(p, **{**kw, "n": 1}, concept=named[0])  # type: ignore[arg-type]
                side_by_side = gr.Gallery(
                    value=[(images[0], "consolidated"), (alone[0], f"{named[0]} alone")], visible=True
                )
        except Exception as e:
            return [], None, gr.Gallery(visible=False), error_message(e)
        captions = [(im, f"seed {kw['seed']} #{i}") for i, im in enumerate(images)]
        return captions, heatmap(blocks, columns, rows, p), side_by_side, ""

    go.click(
        run,
        [prompt, seed, steps, guidance, n],
        [gallery, heat, compare, gen_message],
        concurrency_id=WORK,
        api_name="generate",
    )


def benchmark_tab_ui(ws: Workspace) -> None:
    with gr.Row():
        folder = gr.Textbox(
            "runs/demo",
            label="Run folder (written by `fl2t bench continual` or `fl2t demo`)",
            elem_id="bench-folder",
            scale=4,
        )
        go = gr.Button("Open", elem_id="bench-open", scale=1)
    bench_message = gr.HTML(elem_id="bench-message")
    table = gr.Dataframe(label="Results", elem_id="bench-table", interactive=False, wrap=True)
    figures = gr.Gallery(
        label="Forgetting curves and R[t][i] heat maps",
        columns=2,
        height=420,
        object_fit="contain",
        elem_id="bench-plots",
    )
    grids = gr.Gallery(
        label="Samples after the last task (order 0)",
        columns=3,
        height=320,
        object_fit="contain",
        elem_classes="fl2t-pixels",
        elem_id="bench-grids",
    )

    def run(path: str) -> tuple[Any, Any, Any, str]:
        try:
            header, rows, plots, sample_grids = ws.open_benchmark(path)
        except Exception as e:
            return gr.Dataframe(value=None), [], [], error_message(e)
        return gr.Dataframe(value=rows, headers=header), plots, sample_grids, ""

    go.click(run, folder, [table, figures, grids, bench_message], concurrency_id=WORK)
