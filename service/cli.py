"""`llm-gateway serve | prepare | render | adapters | keys`: the console entry point.

Options may come before or after the command (`llm-gateway --models-file F serve` and
`llm-gateway serve --models-file F` mean the same). Bad input is one line on stderr and a non-zero exit,
never a traceback. `adapters add | list | remove` talk HTTP to a running gateway's operator API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service import __version__
from service.api import admin_client
from service.api.admin_client import AdminError, add_keys_command
from service.ops.settings import ModelKind, Settings


class CliError(Exception):
    """A bad input the user can fix; its message is printed as one line."""


def _load_settings(overrides: dict[str, object]) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors(include_url=False))
        raise CliError(f"invalid configuration: {problems}") from None


def _problem(error: Any) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _serve(args: argparse.Namespace) -> int:
    from service.api.server import serve

    settings = _load_settings({"host": args.host, "port": args.port, "models_file": args.models_file})
    return serve(settings)


def _prepare(args: argparse.Namespace) -> int:
    from service.workers.prepare import PrepareError, prepare_all

    settings = _load_settings({"models_file": args.models_file})
    try:
        prepare_all(settings)
    except PrepareError as exc:
        raise CliError(f"prepare failed: {exc}") from None
    return 0


def _render(args: argparse.Namespace) -> int:
    from service.core.templates import load_tokenizer
    from service.errors import GatewayError

    settings = _load_settings({"models_file": args.models_file})
    try:
        messages = json.loads(args.messages)
    except ValueError as exc:
        example = '[{"role": "user", "content": "Hi"}]'
        raise CliError(f"MESSAGES is not JSON ({exc}); e.g. '{example}'") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise CliError("MESSAGES must be a JSON list of objects with `role` and `content`")
    spec = _instruct_model(settings, args.model)
    try:
        rendered = load_tokenizer(spec, settings).render_chat(messages)
    except (GatewayError, FileNotFoundError, ValueError) as exc:
        raise CliError(getattr(exc, "message", None) or str(exc)) from None
    print(
        json.dumps({"model": spec.name, "prompt": rendered.text, "token_ids": rendered.token_ids}, indent=2)
    )
    return 0


def _instruct_model(settings: Settings, name: str | None) -> Any:
    """The model to render for: `name`, else the first instruct model; a clear error otherwise."""
    names = ", ".join(m.name for m in settings.models)
    if name is None:
        spec = next((m for m in settings.models if m.kind is ModelKind.INSTRUCT), None)
        if spec is None:
            raise CliError(f"no instruct model is configured (models: {names})")
        return spec
    spec = next((m for m in settings.models if m.name == name), None)
    if spec is None:
        raise CliError(f"no model named {name!r} (models: {names})")
    if spec.kind is not ModelKind.INSTRUCT:
        raise CliError(f"{name!r} is a base model: it has no chat template to render")
    return spec


ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
CLI_TIMEOUT = 600.0  # a registration loads the adapter onto a worker first


def _operator(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A call to the running gateway's operator API; its JSON answer, or a CliError with its message."""
    key = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if not key:
        raise CliError(f"the operator API needs an admin key: --admin-key or {ADMIN_KEY_ENV}")
    try:
        return admin_client.call(args.url, key, method, path, body, timeout=CLI_TIMEOUT)
    except AdminError as exc:
        raise CliError(str(exc)) from None


def _adapters_add(args: argparse.Namespace) -> int:
    # The path is the gateway's and its workers' to read: make it absolute here, as the user meant it.
    body: dict[str, Any] = {"model": args.model, "name": args.name, "path": _absolute(args.path),
                            "description": args.description}  # fmt: skip
    if args.kind:
        body["kind"] = args.kind
    if args.chat_template:
        body["chat_template"] = _absolute(args.chat_template)
    added = _operator(args, "POST", "/adapters", body)
    where = ", ".join(added["loaded_on"]) or "no replica yet"
    kind = f"{'an' if added['kind'][:1] in 'aeiou' else 'a'} {added['kind']}"
    print(f"registered {added['name']}: {kind} adapter of {added['model']}, loaded on {where}")
    return 0


def _adapters_list(args: argparse.Namespace) -> int:
    listing = _operator(args, "GET", "/adapters")["data"]
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    rows = [("NAME", "KIND", "MODEL", "SOURCE", "LOADED ON")]
    for a in listing:
        rows.append((a["name"], a["kind"], a["model"], a["source"], ", ".join(a["loaded_on"]) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _adapters_remove(args: argparse.Namespace) -> int:
    removed = _operator(args, "DELETE", "/adapters/" + urllib.parse.quote(args.name, safe=""))
    print(f"removed {removed['name']}")
    return 0


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def _adapters_parser(commands: Any) -> None:
    adapters = commands.add_parser("adapters", help="add, list or remove adapters of a running gateway")
    actions = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="register a LoRA adapter on a model's workers")
    add.add_argument("name", metavar="NAME", help="the adapter's served name")
    add.add_argument("path", metavar="PATH", help="its folder (adapter_config.json and weights)")
    add.add_argument("--model", required=True, help="the served model it was trained from")
    add.add_argument("--kind", choices=["base", "instruct"], help="default: the model's kind")
    add.add_argument("--chat-template", help="a Jinja file for an instruct adapter")
    add.add_argument("--description", default="", help="what it was trained for")
    add.set_defaults(handler=_adapters_add)
    listing = actions.add_parser("list", help="every adapter and the replicas that hold it")
    listing.add_argument("--json", action="store_true", help="the gateway's answer as JSON")
    listing.set_defaults(handler=_adapters_list)
    remove = actions.add_parser("remove", help="stop serving a registered adapter")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_adapters_remove)
    for action in (add, listing, remove):
        action.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
        action.add_argument("--admin-key", help=f"one of its GATEWAY_ADMIN_KEYS (or {ADMIN_KEY_ENV})")


def _models_file_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--models-file", default=default, help="YAML file listing the models (GATEWAY_MODELS_FILE)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every setting also reads GATEWAY_<NAME> from the environment."""
    parser = argparse.ArgumentParser(
        prog="llm-gateway", description="Base and instruct models behind one door, on vLLM workers."
    )
    parser.add_argument("--version", action="version", version=f"llm-gateway {__version__}")
    _models_file_option(parser, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="launch the workers and serve the API")
    serve.add_argument("--host", help="listen address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (GATEWAY_PORT, default 8000)")
    serve.set_defaults(handler=_serve)

    prepare = commands.add_parser("prepare", help="convert the built-in models once (idempotent)")
    prepare.set_defaults(handler=_prepare)

    render = commands.add_parser("render", help="print the chat prompt and token ids for messages")
    render.add_argument(
        "messages", metavar="MESSAGES", help='JSON list, e.g. \'[{"role": "user", "content": "Hi"}]\''
    )
    render.add_argument("--model", help="instruct model name (default: the first)")
    render.set_defaults(handler=_render)
    _adapters_parser(commands)
    for command in (serve, prepare, render):
        # SUPPRESS: an option given before the command is not overwritten by the command's default.
        _models_file_option(command, argparse.SUPPRESS)
    add_keys_command(commands)  # the operator API of a running gateway
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llm-gateway` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (CliError, AdminError) as exc:
        print(f"llm-gateway: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
