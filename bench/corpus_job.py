"""6. Corpus generation through `spd serve` (POST /v1/jobs type `generate`, polled to completion, the
file fetched) / vLLM's offline `LLM.generate` of the same token-id prompts with the same settings.
The offline `LLM` runs the server's engine settings and process model, no plugin: the job's own
cost is what differs. Each repetition's prompts are new to both; the token counts check the work is
the same."""

import time

import httpx

from common import MODEL, Context, Goal, headline, interleave, ratios, spread
from procs import job_record, server_engine

TITLE = "corpus generation job through spd serve / offline vLLM LLM.generate"
GOAL = Goal(">=", 0.9)
USES = {"spd_server", "offline_engine"}


def run(ctx: Context) -> dict:
    from transformers import AutoTokenizer

    from spd_engine import models
    from spd_engine.corpus import read_corpus
    from spd_engine.data import load_examples, resolve_data
    from spd_engine.formatting import text_prompt_ids
    from spd_engine.tasks import stop_strings, user_message

    srv, offline_engine = ctx.resources.get("spd_server", "offline_engine")
    tok = AutoTokenizer.from_pretrained(models.resolve(MODEL))
    gsm = load_examples(resolve_data("gsm8k"), "math")
    n, max_tokens, reps, stop = ctx.size(4, 64), ctx.size(8, 64), ctx.size(1, 3), stop_strings("math")
    client = httpx.Client(base_url=srv.url, timeout=900)
    jobs, tokens, cpu = [], {"job": [], "offline": []}, {"job": [], "offline": []}
    chunk = lambda i: [gsm[((i + 1) * n + j) % len(gsm)] for j in range(n)]  # noqa: E731 - the warm-up's (-1) own

    def job(i):
        body = {"type": "generate", "params": {"task": "math", "max_tokens": max_tokens, "temperature": 0.0,
                "prompts": {"examples": [{"id": e.id, "prompt": e.prompt} for e in chunk(i)]}}}
        c0, t0 = srv.cpu(), time.perf_counter()
        j = job_record(client, jid := client.post("/v1/jobs", json=body).raise_for_status().json()["id"], 0.1)
        dt, dcpu = time.perf_counter() - t0, srv.cpu() - c0
        (path := srv.root / "tmp-corpus.jsonl").write_bytes(client.get(f"/v1/jobs/{jid}/artifact").raise_for_status().content)
        if i >= 0:
            n_tok = sum(row["n_tokens"] for row in read_corpus(path))
            jobs.append({"id": jid, "client_seconds": dt, "server_seconds": j["finished"] - j["started"],
                         "queue_seconds": j["started"] - j["created"], "tokens": n_tok})
            tokens["job"].append(n_tok)
            cpu["job"].append(dcpu)
        return dt

    def offline(i):
        ids = [text_prompt_ids(tok, user_message("math", e)) for e in chunk(i)]
        out = offline_engine.call("offline_generate", prompt_ids=ids, max_tokens=max_tokens, stop=stop)
        if i >= 0:
            tokens["offline"].append(out["tokens"])
            cpu["offline"].append(out["cpu_seconds"])
        return out["seconds"]

    sec = interleave({"job": job, "offline": offline}, reps)
    client.close()
    r = ratios(sec["offline"], sec["job"])
    r_cpu = ratios(*([t / c for t, c in zip(tokens[k], cpu[k])] for k in ("job", "offline")))
    engine, engine_env = server_engine()
    return {
        "settings": {"prompts_per_rep": n, "max_tokens": max_tokens, "temperature": 0.0, "stop": stop, "reps": reps,
                     "task": "math", "server": srv.describe(),
                     "offline": {"engine": {**engine, **engine_env, "VLLM_PLUGINS": "none"},
                                 "start_seconds": offline_engine.state["start_seconds"]}},
        "seconds": sec, "cpu_seconds": cpu, "jobs": jobs, "tokens": tokens,
        "job_tok_s": spread([t / s for t, s in zip(tokens["job"], sec["job"])]),
        "offline_tok_s": spread([t / s for t, s in zip(tokens["offline"], sec["offline"])]),
        "job_over_offline_throughput": r, "job_over_offline_tokens_per_cpu_second": r_cpu,
        "headline": [headline(f"job / offline LLM.generate ({n} prompts, up to {max_tokens} tokens)", r, GOAL, cpu=r_cpu)],
    }
