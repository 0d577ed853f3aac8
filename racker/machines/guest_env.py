"""The environment a guest command runs with, and the encoding its output is in.

As `docker exec` does: racker's base environment, the image's configured Env
(the OCI config's, e.g. LANG) over it, then the user's login variables. The
encoding is the one the locale in effect names, so that a Latin-1 image's
output reads back as the guest wrote it.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE = {"PATH": GUEST_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root"}
# When the image names no locale: one every glibc since 2.35 (and Debian's for longer) has.
FALLBACK_LANG = "C.UTF-8"
# What testinfra does when a guest's encoding is plain ASCII (C, POSIX) or unknown.
FALLBACK_ENCODING = "utf-8"


def image_env(manifest: Mapping) -> dict[str, str]:
    """The image's configured Env ("KEY=VALUE" items), as a dict."""
    items = (manifest.get("config") or {}).get("Env") or []
    return dict(item.split("=", 1) for item in items if "=" in item)


def for_image(manifest: Mapping) -> dict[str, str]:
    """Base environment with the image's Env over it; C.UTF-8 unless the image names a locale."""
    env = {**BASE, **image_env(manifest)}
    if not any(env.get(key) for key in ("LC_ALL", "LC_CTYPE", "LANG")):
        env["LANG"] = FALLBACK_LANG
    return env


def encoding(env: Mapping[str, str]) -> str:
    """The character set of the locale in effect (LC_ALL over LC_CTYPE over LANG), as Python names it:
    de_DE.ISO-8859-1 -> iso8859-1, en_US.UTF-8 -> utf-8; C, POSIX and unnamed ones -> utf-8."""
    locale = next((env[key] for key in ("LC_ALL", "LC_CTYPE", "LANG") if env.get(key)), "")
    charset = locale.partition(".")[2].partition("@")[0]
    try:
        name = codecs.lookup(charset).name if charset else FALLBACK_ENCODING
    except LookupError:
        return FALLBACK_ENCODING
    return FALLBACK_ENCODING if name == "ascii" else name
