"""``radixlm serve``: the engine (scheduler processes) plus the HTTP server in this process.

Ctrl-C or SIGTERM stops uvicorn gracefully, then the engine stops its scheduler processes; if this process is
killed outright, the schedulers notice their parent is gone and exit on their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

from radixlm.config import ServerArgs

logger = logging.getLogger("radixlm.server")


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a Jinja file, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def launch_server(server_args: ServerArgs) -> None:
    import uvicorn

    from radixlm.engine.engine import Engine
    from radixlm.server.app import create_app

    logging.basicConfig(level=server_args.log_level.upper(), format="[radixlm] %(asctime)s %(message)s")
    chat_template = load_chat_template(server_args.chat_template)
    engine = Engine(**dataclasses.asdict(server_args))
    try:
        app = create_app(engine, chat_template)
        config = uvicorn.Config(app, host=server_args.host, port=server_args.port,
                                log_level=server_args.log_level, timeout_keep_alive=30,
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)

        async def serve() -> None:
            task = asyncio.create_task(server.serve())
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started:
                print(f"radixlm is serving {engine.model_path} at http://{server_args.host}:{server_args.port} "
                      f"(OpenAI API under /v1)", flush=True)
            await task

        # uvicorn handles SIGINT/SIGTERM while serving and re-raises the signal once it has stopped; these
        # handlers absorb that re-raise so that the engine below is shut down and the exit status is 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        asyncio.run(serve())
    finally:
        engine.shutdown()
