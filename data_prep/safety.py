"""What a cnnflow job may touch: INPUT and OUTPUT kept apart, and in OUTPUT only what it wrote.

Two rules, both checked before anything is written or deleted:

- INPUT and OUTPUT may not overlap in either direction (equal, or one inside the other),
  compared after following symlinks for local paths and as normalised text for URIs.
  `cnnflow prep dataset/train dataset` once deleted the images it was asked to read.
- A stage claims its OUTPUT with a marker file, `MARKER`, written before its other files
  and naming what it writes there (prep: every file; predict: the runs whose part files
  these are). A later run deletes or replaces only what a marker names; an OUTPUT that
  holds anything else is refused with one line naming it. Hidden entries (`.DS_Store`,
  a file manager's own) are left alone: never deleted, never counted against the folder.

Errors are `PrepError`s (data_prep cannot import workflows/); the stages turn them into
their one-line user errors.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from data_prep.redact import redact_uri
from data_prep.scan import PrepError
from data_prep.schema import join, write_atomic

MARKER = ".cnnflow-output.json"


# --- INPUT and OUTPUT apart -----------------------------------------------------------------


def location(uri: str) -> tuple[str, str]:
    """(file system, path) to compare two locations by.

    Local paths and file:// URIs: the real path, symlinks followed (a folder that does not
    exist yet resolves as far as it does). Other URIs: scheme, bucket and path as text,
    without credentials or query options, dots and repeated slashes normalised.
    """
    parts = urlsplit(uri) if "://" in uri else None
    if parts is None or parts.scheme.lower() == "file":
        path = unquote(parts.path) if parts is not None else uri
        return "local", os.path.realpath(os.path.expanduser(path))
    host = parts.netloc.rpartition("@")[2].lower()
    path = posixpath.normpath("/" + unquote(parts.path).strip("/"))
    return f"{parts.scheme.lower()}://{host}", path


def within(path: str, folder: str, sep: str = "/") -> bool:
    """`path` is `folder` or lies under it (whole names, not string prefixes)."""
    return path == folder or path.startswith(folder.rstrip(sep) + sep)


def check_apart(input: str, output: str) -> None:
    """Refuse an OUTPUT that is INPUT, lies inside it or holds it; nothing is touched."""
    (fs_in, real_in), (fs_out, real_out) = location(input), location(output)
    if fs_in != fs_out:
        return
    sep = os.sep if fs_in == "local" else "/"
    if real_in == real_out:
        how = "is the input folder"
    elif within(real_out, real_in, sep):
        how = f"is inside the input {redact_uri(input)}"
    elif within(real_in, real_out, sep):
        how = f"holds the input {redact_uri(input)}"
    else:
        return
    # A symlink in the way is named, so that the user sees why two names are one folder.
    given = unquote(urlsplit(output).path) if "://" in output else os.path.expanduser(output)
    via = f" (really {real_out})" if fs_out == "local" and os.path.abspath(given) != real_out else ""
    raise PrepError(
        f"output {redact_uri(output)}{via} {how}: cnnflow never writes where it reads; "
        "choose an output folder outside the input (nothing was written)"
    )


# --- the marker ------------------------------------------------------------------------------


def read_marker(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    """The marker in OUTPUT, or None when there is none (or it is not one of ours)."""
    path = join(root, MARKER)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as src:
            marker = json.loads(src.read())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("written_by"), str) else None


def write_marker(uri: str, written_by: str, **fields: Any) -> None:
    from data_prep.report import cnnflow_version

    payload = {"written_by": written_by, "cnnflow_version": cnnflow_version(), **fields}
    write_atomic(join(uri, MARKER), json.dumps(payload, indent=1).encode() + b"\n")


def visible_entries(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    """A folder's entries, hidden ones (names starting with a dot) left out; sorted by name."""
    entries = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted((e for e in entries if not e.base_name.startswith(".")), key=lambda e: e.base_name)


def refuse_foreign(output: str, foreign: list[str], *, stage: str) -> None:
    """One line naming what cnnflow did not write in OUTPUT; raises if there is any."""
    if not foreign:
        return
    listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise PrepError(
        f"output {redact_uri(output)} holds files that `cnnflow {stage}` did not write ({listed}); "
        "cnnflow replaces only its own output: choose a new or empty folder (nothing was changed)"
    )
