"""Secrets out of everything a run leaves behind: params, tags, descriptions, logs, errors.

A URI can carry credentials (`postgresql://mlflow:PASSWORD@db/mlflow`,
`https://TOKEN@host/...`, `s3://KEY:SECRET@bucket/...`, a signed URL's `?X-Amz-Signature=...`).
Every text this project writes into MLflow, a Ray job's metadata or the console goes through
`redact`, which keeps the URI readable and replaces the secret parts with `***`.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://user:password@  and  http(s)://token@  (a bare userinfo on HTTP is usually a token)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@:\s'\"]*)"
                       r"(?::(?P<password>[^/@\s'\"]*))?@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;](?:[\w.\-]*(?:token|passw(?:or)?d|pwd|secret|sig|signature|credential|"
    r"api[_-]?key|access[_-]?key|auth)[\w.\-]*))=(?P<value>[^&;#\s'\"]*)", re.IGNORECASE)
SECRET_ENV = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY)",
                        re.IGNORECASE)
"""Names of environment variables whose values are secrets (MLFLOW_TRACKING_PASSWORD, ...)."""


def _userinfo(match: re.Match) -> str:
    scheme, user, password = match["scheme"], match["user"], match["password"]
    if password is not None:
        return f"{scheme}{user}:{MASK}@"
    if scheme.lower() in ("http://", "https://") and user:
        return f"{scheme}{MASK}@"
    return match.group(0)


def redact(text: str) -> str:
    """`text` with the credentials inside any URI it contains replaced by ***."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_userinfo, text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}={MASK}", text)


def has_secret(text: str) -> bool:
    return redact(text) != text


def redact_value(value: Any) -> Any:
    """redact() applied to every string in a (nested) value."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value
