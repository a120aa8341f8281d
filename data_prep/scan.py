"""Listing an image folder (local or any pyarrow URI) and labelling its files.

A labelled file's split is decided from its bytes when its task reads it
(data_prep/splits.py), so the scan leaves it as BY_CONTENT.

Everything here runs in the driver and reads only names, never image bytes: a few
bytes per file. Every listed entry ends up in `Scan.files` (to be decoded), in
`Scan.skipped` or in `Scan.quarantined` with a reason, so the accounting can be checked
later.

A local INPUT is listed without ever leaving it (`_list_local`): a symlink is followed
only when it resolves inside INPUT, and each real folder is listed once, so a link to
/etc or a link loop is one skipped entry, not a thousand rows. A name whose bytes are not
UTF-8 cannot be stored in a string column or opened through pyarrow: it is quarantined
under a readable form (`readable_name`), never a crash.
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from data_prep.decode import IMAGE_EXTENSIONS
from data_prep.options import PrepOptions, label_source
from data_prep.schema import BY_CONTENT, UNLABELED, UNLABELED_LABEL, join, resolve

HIDDEN_NAMES = frozenset({"__MACOSX"})  # macOS zip residue, alongside dot-files
NOT_UTF8 = "name is not valid UTF-8 (its bytes shown as \\xNN); rename it to include it"


class PrepError(ValueError):
    """Input that cannot be prepared: the message says what was found and what to do."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to INPUT, forward slashes
    label: int  # index into Scan.classes; -1 when unlabeled
    split: str  # data when unlabeled; else BY_CONTENT: its task decides (data_prep/splits.py)


@dataclass
class Scan:
    input: str  # absolute path or URI
    classes: list[str]
    files: list[SourceFile]
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{path, reason}]
    empty_classes: list[str] = field(default_factory=list)  # class folders without images
    csv_missing: list[str] = field(default_factory=list)  # csv rows naming no image file
    quarantined: list[dict[str, str]] = field(default_factory=list)  # [{path, reason}]: cannot be read by name

    @property
    def scanned(self) -> int:
        return len(self.files) + len(self.skipped) + len(self.quarantined)


def normalize_uri(uri: str) -> str:
    """Absolute local paths (so the manifest says where the data came from); URIs as given."""
    return uri.rstrip("/") if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def scan(input: str, options: PrepOptions | None = None) -> Scan:
    """List INPUT and label every image file; raise PrepError if unusable.

    Of the options, `labels` and `unlabeled` count (default: prep's).
    """
    options = options or PrepOptions()
    root = normalize_uri(input)
    fs, base = resolve(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {input} does not exist")
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"input {input} is not a folder")

    if fs.type_name == "local":
        paths, top_dirs, skipped = _list_local(base)
    else:  # object stores have no symlinks, and their keys are UTF-8
        listing = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        prefix = base.rstrip("/") + "/"
        paths = [i.path[len(prefix):] for i in listing if i.type == pafs.FileType.File]
        top_dirs = [
            i.path[len(prefix):]
            for i in listing
            if i.type == pafs.FileType.Directory and "/" not in i.path[len(prefix):]
        ]
        skipped = []

    quarantined: list[dict[str, str]] = []
    images: list[str] = []
    for path in sorted(paths):
        shown = readable_name(path)
        reason = _skip_reason(shown)
        if reason:
            skipped.append({"path": shown, "reason": reason})
        elif shown != path:
            quarantined.append({"path": shown, "reason": NOT_UTF8})
        else:
            images.append(path)
    top_dirs = sorted(readable_name(d) for d in top_dirs)

    if options.unlabeled:
        files = [SourceFile(p, UNLABELED_LABEL, UNLABELED) for p in images]
        result = Scan(root, [], files, skipped, quarantined=quarantined)
        _check_found(result, input, labels="unlabeled")
        return result

    named, csv_missing = _label(images, options.labels, root, skipped)
    classes = sorted(set(named.values()))
    index = {name: i for i, name in enumerate(classes)}
    files = [SourceFile(p, index[named[p]], BY_CONTENT) for p in sorted(named)]
    empty = [d for d in top_dirs if d not in index and not _hidden(d)] if options.labels == "folder" else []
    result = Scan(root, classes, files, skipped, empty, csv_missing, quarantined)
    _check_found(result, input, labels=options.labels)
    return result


def readable_name(path: str) -> str:
    """`path` as valid UTF-8 text: bytes that are not UTF-8 shown as \\xNN escapes.

    Python gives such bytes as surrogates (os.fsdecode's surrogateescape); they cannot be
    written to Parquet, JSON or CSV as they are. Valid names come back unchanged.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _list_local(root: str) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """(files, top-level folders, skipped entries) under a local folder, never leaving it.

    Depth first in name order. A symlink is followed only when its real path lies inside
    the real INPUT; each real folder is listed once (the set of real folders visited), so
    a loop, or a second way into a folder already listed, is one skipped entry. Entries
    that are neither files nor folders (a named pipe would block a reader forever) are
    skipped too. Paths are relative, with forward slashes, as the OS spells them.
    """
    real_root = os.path.realpath(root)
    visited = {real_root}
    files: list[str] = []
    top: list[str] = []
    skipped: list[dict[str, str]] = []

    def skip(rel: str, reason: str) -> None:
        skipped.append({"path": readable_name(rel), "reason": reason})

    stack: list[tuple[str, str, tuple[str, ...]]] = [("", root, (real_root,))]  # (prefix, folder, real ancestors)
    while stack:
        prefix, folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            if not prefix:
                raise  # INPUT itself cannot be listed: the user's error, one line
            skip(prefix.rstrip("/"), f"unreadable folder ({exc.strerror})")
            continue
        below: list[tuple[str, str, tuple[str, ...]]] = []
        for entry in entries:
            rel = prefix + entry.name
            link = entry.is_symlink()
            real = os.path.realpath(entry.path) if link else os.path.join(ancestors[-1], entry.name)
            if link and not _inside(real, real_root):
                skip(rel, "symlink to outside the input")
            elif entry.is_dir():  # follows a link (which stays inside INPUT, checked above)
                if real in ancestors:
                    skip(rel, "symlink loop")
                elif real in visited:
                    skip(rel, "symlink to a folder listed already" if link else "folder listed already through a symlink")
                else:
                    visited.add(real)
                    below.append((rel + "/", entry.path, (*ancestors, real)))
                    if not prefix:
                        top.append(rel)
            elif entry.is_file():
                files.append(rel)
            elif link:
                skip(rel, "broken symlink")
            else:
                skip(rel, "not a regular file")
        stack.extend(reversed(below))
    return files, top, skipped


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _hidden(path: str) -> bool:
    return any(part.startswith(".") or part in HIDDEN_NAMES for part in path.split("/"))


def _skip_reason(path: str) -> str | None:
    if _hidden(path):
        return "hidden file"
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        return f"not an image by extension ({ext or 'none'})"
    return None


def _label(
    images: list[str], labels: str, root: str, skipped: list[dict[str, str]]
) -> tuple[dict[str, str], list[str]]:
    """{path: class name} for the images that have a label; the others are skipped."""
    named: dict[str, str] = {}
    csv_missing: list[str] = []
    source, argument = label_source(labels)
    if source == "folder":
        for path in images:
            if "/" in path:
                named[path] = path.split("/", 1)[0]
            else:
                skipped.append({"path": path, "reason": "not in a class folder"})
    elif source == "regex":
        pattern = _compile(argument)
        for path in images:
            match = pattern.search(path.rsplit("/", 1)[-1])
            if match and match.group(1):
                named[path] = match.group(1)
            else:
                skipped.append({"path": path, "reason": f"name does not match {pattern.pattern}"})
    else:  # csv
        table = read_label_csv(argument, root)
        present = set(images)
        for path in images:
            if path in table:
                named[path] = table[path]
            else:
                skipped.append({"path": path, "reason": "not listed in the labels csv"})
        csv_missing = sorted(p for p in table if p not in present)
    return named, csv_missing


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise PrepError(f"labels regex {pattern!r} is not a valid regular expression: {exc}") from None
    if compiled.groups < 1:
        raise PrepError(f"labels regex {pattern!r} needs a group for the class, e.g. ^(\\w+)\\.")
    return compiled


def read_label_csv(location: str, root: str) -> dict[str, str]:
    """{path: label} from rows `path,label` (an optional header row `path,label`).

    FILE is a path or URI as given, else relative to INPUT. Paths are relative to INPUT.
    """
    candidates = [location] if "://" in location or os.path.isabs(location) else [location, join(root, location)]
    for candidate in candidates:
        fs, path = resolve(normalize_uri(candidate))
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as src:
                data = src.read()
            break
    else:
        raise FileNotFoundError(f"labels csv {location} not found (also looked in {root})")

    # Errors name lines, never what is on them: FILE may be any file the user can read
    # (csv:/etc/passwd), and its content does not belong on a terminal or in a log.
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PrepError(f"labels csv {location} is not UTF-8 text") from None
    table: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        rows = list(enumerate(csv.reader(io.StringIO(text)), start=1))
    except csv.Error as exc:  # e.g. a NUL byte, or a field over csv's size limit
        raise PrepError(f"labels csv {location} is not CSV ({type(exc).__name__})") from None
    for line, row in rows:
        if not row or all(not cell.strip() for cell in row):
            continue
        if line == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise PrepError(
                f"{location}, line {line}: expected two non-empty fields `path,label`, got {len(row)} field(s)"
            )
        path = row[0].strip().replace("\\", "/").removeprefix("./")
        label = row[1].strip()
        if table.get(path, label) != label:
            raise PrepError(f"{location}, lines {first_line[path]} and {line}: one path with two different labels")
        table[path] = label
        first_line.setdefault(path, line)
    return table


def _check_found(result: Scan, input: str, *, labels: str) -> None:
    """An input with no images, or with fewer than two classes, is an error saying why."""
    reasons = Counter(s["reason"] for s in result.skipped)
    found = f"{result.scanned} files, {len(result.files)} labelled images"
    if result.quarantined:
        found += f", {len(result.quarantined)} with names that are not UTF-8"
    if reasons:
        found += "; skipped: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common(4))
    if not result.files:
        hint = ""
        if reasons.get("not in a class folder"):
            hint = (
                " With --labels folder each class needs its own subfolder (INPUT/<class>/...);"
                " for a flat folder use --labels regex:PATTERN or csv:FILE, or --unlabeled."
            )
        raise PrepError(f"no images to prepare in {input} ({found}).{hint}")
    if labels != "unlabeled" and len(result.classes) < 2:
        counts = Counter(f.label for f in result.files)
        seen = ", ".join(f"{name}: {counts[i]} images" for i, name in enumerate(result.classes))
        raise PrepError(
            f"only one class in {input} ({seen}); a classifier needs at least two "
            f"(labels from {labels}; use --unlabeled for images without labels)"
        )
