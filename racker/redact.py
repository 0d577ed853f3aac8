"""Secrets in URLs: taken apart to be used, and kept out of everything racker shows or stores.

A URL's `user:password@` is HTTP basic auth, as curl and pip take it: `split_userinfo()` hands it
to the one place that sends it (download.py) and leaves a URL without it. Everything racker
prints, logs, stores in a manifest or writes into results goes through `url()` or `text()`,
which drop the userinfo and mask the query parameters that carry tokens (signed download URLs).
"""

from __future__ import annotations

import re
import urllib.parse

MASK = "***"
# Query parameters whose value is a credential: tokens, API keys, pre-signed URLs' signatures.
_SECRET_PARAMS = re.compile(
    r"(?i)^(?:.*token.*|.*secret.*|.*passw(?:or)?d.*|.*signature.*|sig|key|api[_-]?key|auth|authorization|"
    r"credential|x-amz-credential|x-amz-security-token|x-goog-credential|code|session)$"
)
# scheme://userinfo@ anywhere in free text (an error message, a tool's stderr, a command line).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s@'\"]+)@")
# name=value pairs in a URL's query anywhere in free text.
_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^&#\s'\"]*)")


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """(the URL without `user:password@`, (user, password) percent-decoded, or None if it had none)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    clean = urllib.parse.urlunsplit(parts._replace(netloc=hostport))
    return clean, (urllib.parse.unquote(user), urllib.parse.unquote(password))


def url(text: str) -> str:
    """A URL fit to show or store: no userinfo, and the values of token-like query parameters masked."""
    clean, _ = split_userinfo(text)
    parts = urllib.parse.urlsplit(clean)
    if not parts.query:
        return clean
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if not any(_SECRET_PARAMS.match(name) for name, _ in pairs):
        return clean
    masked = "&".join(f"{urllib.parse.quote(n, safe='')}={_value(n, v)}" for n, v in pairs)
    return urllib.parse.urlunsplit(parts._replace(query=masked))


def _value(name: str, value: str) -> str:
    return MASK if _SECRET_PARAMS.match(name) else urllib.parse.quote(value, safe="")


def text(message: str) -> str:
    """Free text (an error, a command line, a tool's output) with every URL's secrets masked."""
    message = _USERINFO.sub(lambda m: m["scheme"], message)
    return _QUERY_PAIR.sub(lambda m: f"{m['sep']}{m['name']}={MASK}" if _SECRET_PARAMS.match(m["name"]) else m[0], message)
