"""This project inside vLLM: the `spd_kv_projection` general plugin (`vllm_plugin`: K/V projection
in the engine, request admission in the front end), the `spd_api` endpoint plugin (`api_plugin`:
resource routes, capability fields, the console) with its state, jobs and steps, and `spd serve`
(`__main__`: vLLM's OpenAI server with both plugins)."""
