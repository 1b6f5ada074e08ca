"""`llm-gateway serve | prepare | render`: the console entry point."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from service.ops.settings import Settings


def _load_settings(overrides: dict[str, object]) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc


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
        print(f"prepare failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _render(args: argparse.Namespace) -> int:
    from service.core.templates import load_tokenizers

    settings = _load_settings({"models_file": args.models_file})
    messages = json.loads(args.messages)
    tokenizers = load_tokenizers(settings)
    model = args.model or next(m.name for m in settings.models if m.kind == "instruct")
    rendered = tokenizers[model].render_chat(messages)
    print(json.dumps({"model": model, "prompt": rendered.text, "token_ids": rendered.token_ids}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every setting also reads GATEWAY_<NAME> from the environment."""
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    parser.add_argument("--models-file", help="YAML file listing models (GATEWAY_MODELS_FILE)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="launch workers and serve the API")
    serve.add_argument("--host", help="listen address (GATEWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (GATEWAY_PORT, default 8000)")
    serve.set_defaults(handler=_serve)

    prepare = commands.add_parser("prepare", help="convert the built-in models once (idempotent)")
    prepare.set_defaults(handler=_prepare)

    render = commands.add_parser("render", help="print the chat prompt and token ids for messages")
    render.add_argument("messages", help='JSON list, e.g. \'[{"role": "user", "content": "Hi"}]\'')
    render.add_argument("--model", help="instruct model name (default: the first)")
    render.set_defaults(handler=_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llm-gateway` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
