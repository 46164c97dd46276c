"""`fl2t ui`: the web app for a concept library (Gradio), on 127.0.0.1 unless asked otherwise.

    from fl2t.ui import launch
    launch("my-lib")                       # http://127.0.0.1:7860

The app holds no method of its own: `fl2t.ui.actions` calls the library functions the command line calls, and
`fl2t.ui.app` lays them out in four tabs (Library, Learn, Generate, Benchmark).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# Before Gradio is imported: no usage statistics are sent anywhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_LIBRARY = Path("fl2t-library")


def launch(
    library: str | Path = DEFAULT_LIBRARY,
    *,
    base: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    config: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Serve the app for `library` (created by the first learn) until interrupted."""
    from fl2t.errors import Fl2tError

    try:
        import gradio as gr
    except ImportError:
        raise Fl2tError("the web app needs Gradio: pip install 'fl2t[ui]'") from None
    from fl2t.ui.actions import Workspace
    from fl2t.ui.app import CSS, build_app

    ws = Workspace(library, base=base, config=config)
    app = build_app(ws)
    if host not in LOCAL_HOSTS:
        say(
            f"warning: serving on {host}, not only on this machine: anyone who can reach port {port} can learn, "
            "forget and export concepts of this library (there is no login)"
        )
    say(f"fl2t ui: open http://{host}:{port} (library {ws.library}, base {ws.base_id()})")
    # Local fonts only: the page must not fetch anything from the internet.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=False,
            ssr_mode=False,
            show_error=True,
            max_file_size="100mb",
            footer_links=[],
            theme=theme,
            css=CSS,
        )
    except OSError as e:
        raise Fl2tError(f"cannot serve on {host}:{port} ({e}); pass another --port or --host") from None
