"""The HTTP server and the vLLM integration (see the open issues)."""
