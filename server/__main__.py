"""`python -m server` / `spd serve`: run the SPD server with uvicorn and the job worker."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    from spd_engine import models, paths

    env = os.environ.get
    p = argparse.ArgumentParser(prog="spd serve", description="OpenAI-compatible server with capability modes.")
    p.add_argument("--host", default=env("SPD_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("SPD_PORT", "8000")))
    p.add_argument("--model", default=env("SPD_MODEL", models.DEFAULT_MODEL),
                   help="a bundled model name or a local HF model directory")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], default=env("SPD_BACKEND", "auto"),
                   help="auto: vLLM when installed, else transformers")
    p.add_argument("--store", default=str(paths.store_dir()), help="subspace store dir ($SPD_STORE_DIR)")
    p.add_argument("--data-dir", default=env("SPD_SERVER_DATA", str(Path.home() / ".local/share/spd")),
                   help="jobs database, job artifacts and the adapters dir ($SPD_SERVER_DATA)")
    p.add_argument("--api-key", default=env("SPD_API_KEY"), help="require 'Authorization: Bearer KEY' ($SPD_API_KEY)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--no-worker", action="store_true", help="do not run jobs in this process")
    p.add_argument("--log-level", default=env("SPD_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import uvicorn

    from .app import create_app
    from .observability import setup_logging
    from .settings import Settings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging(args.log_level.upper())
    settings = Settings(model=args.model, backend=args.backend, store_dir=Path(args.store), data_dir=Path(args.data_dir),
                        api_key=args.api_key or None, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
                        max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens,
                        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, hf_batch_size=args.hf_batch_size,
                        run_worker=not args.no_worker)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
