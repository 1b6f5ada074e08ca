"""The operator CLI's HTTP client: the admin key goes to the address given and nowhere else."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.api.admin_client import AdminError, call
from service.cli import CliError, _operator


@contextmanager
def serve(answer: tuple[int, dict[str, str]], seen: list[str | None], body: bytes = b"{}") -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            status, headers = answer
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_redirect_is_not_followed_with_the_admin_key() -> None:
    """Review of issue 20 (s27): `adapters list --url` against an address answering 302 elsewhere sent
    `Authorization: Bearer <admin key>` to the other origin."""
    elsewhere: list[str | None] = []
    first: list[str | None] = []
    with serve((200, {}), elsewhere) as target, serve((302, {"Location": f"{target}/x"}), first) as url:
        with pytest.raises(AdminError, match=r"redirects to .* the admin key is not sent there"):
            call(url, "adm", "GET", "/adapters")
        assert first == ["Bearer adm"] and elsewhere == []
        assert call(target, "adm", "GET", "/adapters") == {}  # no redirect: answered as before


def test_the_adapters_commands_follow_no_redirect_either() -> None:
    """`adapters list|add|remove` had a client of their own that followed redirects (re-review, s27)."""
    elsewhere: list[str | None] = []
    first: list[str | None] = []
    with serve((200, {}), elsewhere) as target, serve((307, {"Location": f"{target}/x"}), first) as url:
        args = argparse.Namespace(url=url, admin_key="adm")
        with pytest.raises(CliError, match=r"redirects to .* the admin key is not sent there"):
            _operator(args, "GET", "/adapters")
        assert first == ["Bearer adm"] and elsewhere == []


def test_an_answer_that_is_not_json_is_one_line_not_a_traceback() -> None:
    seen: list[str | None] = []
    with (
        serve((200, {}), seen, b"<html>not json</html>") as url,
        pytest.raises(AdminError, match="answered something other than JSON"),
    ):
        call(url, "adm", "GET", "/adapters")
