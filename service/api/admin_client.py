"""`llm-gateway keys create|list|revoke|usage`: the operator API of a running gateway, over HTTP with an
admin key (GATEWAY_URL and GATEWAY_ADMIN_KEY, or --url and --admin-key). Answers are printed as the
gateway gives them (JSON); a refusal or an unreachable gateway is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_SECONDS = 30
BUDGET = re.compile(r"^(\d[\d_]*)(?:/(day|month|none))?$")


class AdminError(Exception):
    """A refusal or a failure to reach the gateway, said in one line."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is not followed: it would carry the admin key to wherever it points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def call(
    url: str, admin_key: str, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> Any:  # fmt: skip
    """One operator request; its JSON answer, or an AdminError with the gateway's own message."""
    if not admin_key:
        raise AdminError(
            "no admin key: set GATEWAY_ADMIN_KEY or pass --admin-key (one of GATEWAY_ADMIN_KEYS)"
        )
    params = {name: value for name, value in (query or {}).items() if value is not None}
    target = url.rstrip("/") + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {admin_key}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(target, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            answer = response.read()
        return json.loads(answer or b"null")
    except ValueError:
        raise AdminError(f"{url} answered something other than JSON: is it the gateway?") from None
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise AdminError(
                f"{exc.code}: {url} redirects to {exc.headers.get('Location')}; the admin key is not sent "
                "there: give the gateway's own address in --url or GATEWAY_URL"
            ) from None
        raise AdminError(f"{exc.code}: {_message(exc.read())}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the gateway at {url} ({reason})") from None


def _message(raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return str(error["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip()[:300] or "no message"


def token_budget(text: str) -> dict[str, Any]:
    """`100000/day`, `5000000/month`, `1000000/none` (or without a period: per day)."""
    match = BUDGET.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected TOKENS/day, TOKENS/month or TOKENS/none; got {text!r}")
    return {"tokens": int(match.group(1).replace("_", "")), "period": match.group(2) or "day"}


def _listed(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _create(args: argparse.Namespace) -> Any:
    policy = {
        "name": args.name, "models": args.models, "kinds": args.kinds, "rate_limit": args.rate_limit,
        "max_concurrent": args.max_concurrent, "token_budget": args.token_budget,
    }  # fmt: skip
    answer = call(
        args.url, args.admin_key, "POST", "/keys", {k: v for k, v in policy.items() if v is not None}
    )
    return answer["key"] if args.secret_only else answer


def _list(args: argparse.Namespace) -> Any:
    return call(args.url, args.admin_key, "GET", "/keys", query={"revoked": "true" if args.revoked else None})


def _revoke(args: argparse.Namespace) -> Any:
    return call(args.url, args.admin_key, "DELETE", f"/keys/{urllib.parse.quote(args.key, safe='')}")


def _usage(args: argparse.Namespace) -> Any:
    query = {"key": args.key, "model": args.model, "period": args.period}
    return call(args.url, args.admin_key, "GET", "/usage", query=query)


def run(args: argparse.Namespace) -> int:
    """Run a `keys` command; print its answer."""
    answer = args.action(args)
    print(answer if isinstance(answer, str) else json.dumps(answer, indent=2))
    return 0


def add_keys_command(commands: Any) -> None:
    """`keys create|list|revoke|usage` on the CLI's subcommands."""
    keys = commands.add_parser("keys", help="manage API keys of a running gateway (operator API)")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="a new key with its policy (its secret is printed this once)")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument(
        "--models", type=_listed, help="served models it may use, comma-separated (adapters too)"
    )
    create.add_argument("--kinds", type=_listed, help="kinds of model it may use: base, instruct")
    create.add_argument("--rate-limit", help="requests it may make, such as 60/minute")
    create.add_argument("--max-concurrent", type=int, help="requests it may have in progress at once")
    create.add_argument(
        "--token-budget", type=token_budget, help="tokens per period: 100000/day, .../month, .../none"
    )
    create.add_argument(
        "--secret-only", action="store_true", help="print only the key's secret (for scripts)"
    )
    create.set_defaults(action=_create)
    listing = actions.add_parser("list", help="the keys (never their secrets) with their budgets' numbers")
    listing.add_argument("--revoked", action="store_true", help="include revoked keys")
    listing.set_defaults(action=_list)
    revoke = actions.add_parser(
        "revoke", help="revoke a key (every gateway process stops taking it within a second)"
    )
    revoke.add_argument("key", metavar="KEY", help="its id, or a name one key has")
    revoke.set_defaults(action=_revoke)
    usage = actions.add_parser("usage", help="requests, errors and tokens per key, model and day")
    usage.add_argument("--key", help="one key (id or name)")
    usage.add_argument("--model", help="one served model")
    usage.add_argument("--period", default="month", help="day, month (default), all, 2026-12-05 or 2026-12")
    usage.set_defaults(action=_usage)
    for action in (create, listing, revoke, usage):
        action.add_argument("--url", default=os.environ.get("GATEWAY_URL", DEFAULT_URL),
                            help=f"the gateway (GATEWAY_URL, default {DEFAULT_URL})")  # fmt: skip
        action.add_argument("--admin-key", default=os.environ.get("GATEWAY_ADMIN_KEY", ""),
                            help="one of its GATEWAY_ADMIN_KEYS (GATEWAY_ADMIN_KEY)")  # fmt: skip
    keys.set_defaults(handler=run)
