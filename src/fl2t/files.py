"""Writing files so that a reader never sees half of one, reading JSON a user may have damaged, and the fault
injection the crash tests use."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fl2t.errors import Fl2tError

Model = TypeVar("Model", bound=BaseModel)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Fl2tError(f"{path}: missing; the library is damaged") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Fl2tError(
            f"{path}: not valid JSON ({e}); the library is damaged: restore it from a backup "
            "(`fl2t library check` lists what is wrong)"
        ) from None


def read_validated(model: type[Model], path: Path) -> Model:
    """Read a JSON file into a pydantic model; a file that breaks the schema is one user error."""
    try:
        return model(**read_json(path))
    except (TypeError, ValidationError) as e:
        detail = e.errors()[0] if isinstance(e, ValidationError) else {"loc": (), "msg": str(e)}
        where = ".".join(str(x) for x in detail["loc"]) or "file"
        raise Fl2tError(f"{path}: {where}: {detail['msg']}; the file does not follow fl2t's schema") from None


def kill_point(name: str) -> None:
    """Fault injection for the crash tests: `FL2T_KILL_AT=<name>` makes the process die here as if SIGKILLed."""
    if os.environ.get("FL2T_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
