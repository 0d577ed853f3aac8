"""The one redaction helper: what it takes out of a URL or a message, and what it leaves."""

from __future__ import annotations

import urllib.request

from racker import redact
from racker.sources import download
from racker.store import refs


def test_userinfo_is_split_off_and_decoded() -> None:
    assert redact.split_userinfo("https://bar:S3c%40ret@127.0.0.1:8443/x") == ("https://127.0.0.1:8443/x", ("bar", "S3c@ret"))
    assert redact.split_userinfo("https://127.0.0.1/x") == ("https://127.0.0.1/x", None)


def test_a_url_keeps_its_place_and_loses_its_secrets() -> None:
    assert redact.url("https://u:p@h/a/b.tar?X-Amz-Signature=zz&v=2#sha256=ab") == "https://h/a/b.tar?X-Amz-Signature=***&v=2#sha256=ab"
    assert redact.url("https://h/a?page=2") == "https://h/a?page=2"


def test_free_text_is_redacted_wherever_a_url_sits() -> None:
    said = "git fetch https://oauth2:glpat-xyz@git.example/r.git failed; see https://h/x?token=abc&n=1"
    assert redact.text(said) == "git fetch https://git.example/r.git failed; see https://h/x?token=***&n=1"


def test_a_reference_names_itself_without_its_secrets_and_fetches_with_them() -> None:
    ref = refs.parse("https://bar:S3cret@127.0.0.1/r.tar.xz?token=T0k")
    assert str(ref) == "https://127.0.0.1/r.tar.xz?token=***"
    assert ref.fetch_target == "bar:S3cret@127.0.0.1/r.tar.xz?token=T0k"
    assert ref == refs.parse("https://127.0.0.1/r.tar.xz?token=***")


def test_credentials_do_not_follow_a_redirect_to_another_host() -> None:
    handler = download._RedirectHandler(plain_ok=False)
    request = urllib.request.Request("https://a.example/x", headers={"Authorization": "Basic eDp5"})
    same = handler.redirect_request(request, None, 302, "Found", {}, "https://a.example/y")
    other = handler.redirect_request(request, None, 302, "Found", {}, "https://b.example/y")
    assert same.get_header("Authorization") == "Basic eDp5"
    assert other.get_header("Authorization") is None
