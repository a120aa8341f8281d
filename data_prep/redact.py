"""Credentials inside URIs, hidden wherever options are logged or shown.

A URI may carry a secret: `s3://KEY:SECRET@bucket/shards` (pyarrow reads S3 keys from
it), `https://user:password@mlflow.example`, `...?X-Amz-Signature=...`. Every option is
logged to MLflow (params, tags, config artifacts), saved beside outputs and echoed on the
terminal, so each of those passes through `redacted` / `redact_uri` first: MLflow writes
in `workflows/tracking/`, terminal text in `workflows/terminal.py` and the CLI's error
line, files in the stage that writes them. Here, not in `workflows/`, because prep's own
files (manifest.json, report.json) need it too and `data_prep/` never imports `workflows/`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

HIDDEN = "***"
# `scheme://user:password@` or `scheme://token@`. The password runs to the first "@", not
# to the first "/": AWS secret keys hold unencoded slashes, and a user:password before
# the host is what the "@" marks.
_USERINFO = re.compile(r"(?<=://)(?:[^/?#@\s:]*:[^@\s]*|[^/?#@\s]*)@")
# Query parameters that are secrets by name: presigned URLs, access keys, tokens.
_SECRET_QUERY = re.compile(
    r"(?i)([?&][^=&#\s]*(?:secret|password|passwd|token|signature|credential|key)[^=&#\s]*=)[^&#\s]*"
)


def redact_uri(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by ***."""
    text = _USERINFO.sub(f"{HIDDEN}@", text)
    return _SECRET_QUERY.sub(rf"\g<1>{HIDDEN}", text)


def redacted(value: Any) -> Any:
    """`value` with every string in it redacted: dicts (values), lists and tuples walked."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, Mapping):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(v) for v in value)
    return value


def unredact(saved: Any, given: Any) -> Any:
    """What was saved redacted, with its secret back from what the user gave again.

    A stored value is `given`'s redaction when the user passed the same URI with its
    credentials (a resumed search); otherwise the stored value stands. Secrets come
    back only from the command line, never from a store.
    """
    if isinstance(saved, str) and isinstance(given, str) and given != saved and redact_uri(given) == saved:
        return given
    return saved
