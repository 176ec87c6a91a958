"""The child process of `draftflow evaluate --engine vllm`: the only code that imports vLLM.

    python -m draftflow.engines.vllm_worker REQUEST.json RESULT.json

Runs in its own process because vLLM sets up its own engine process, thread binding
and logging, and must not share a torch thread pool or a transformers import with the
evaluator. It serves the same token-id prompts twice with greedy sampling in float32:
once with the EAGLE3 draft (`method: eagle3`), once plain, and writes the outputs, the
per-request acceptance log (one entry per verify step) and vLLM's own Prometheus
spec-decode counters as JSON. `engines/vllm.py` reads that JSON and the log.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _counters(llm) -> dict:
    """vLLM's spec-decode counters (`vllm:spec_decode_*`), summed over engines."""
    from vllm.v1.metrics.reader import Counter, Vector

    out = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "num_accepted_tokens_per_pos": None}
    for metric in llm.get_metrics():
        key = metric.name.removeprefix("vllm:spec_decode_")
        if isinstance(metric, Vector) and key == "num_accepted_tokens_per_pos":
            prev = out[key] or [0] * len(metric.values)
            out[key] = [a + b for a, b in zip(prev, metric.values)]
        elif isinstance(metric, Counter) and key in out:
            out[key] += metric.value
    return out


def _generate(llm, prompts, params) -> tuple[list, float]:
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs], time.perf_counter() - start


def _shutdown(llm) -> None:
    # LLM has no close(); stop its engine process before the next LLM starts its own.
    llm.llm_engine.engine_core.shutdown()


def serve(req: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    common = dict(model=req["target"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                  seed=0, max_model_len=req["max_model_len"], kv_cache_memory_bytes=req["kv_cache_bytes"])
    # stop_token_ids: without a tokenizer vLLM knows no EOS; these are the evaluator's.
    params = SamplingParams(temperature=0.0, max_tokens=req["max_new_tokens"],
                            stop_token_ids=req["eos_ids"], detokenize=False)
    start = time.perf_counter()
    spec = LLM(**common, disable_log_stats=False, per_request_spec_decode_metrics="detailed",
               speculative_config={"method": "eagle3", "model": req["draft"],
                                   "num_speculative_tokens": req["depth"]})
    spec_init_s = time.perf_counter() - start
    spec_outs, spec_s = _generate(spec, req["prompts"], params)
    counters = _counters(spec)
    _shutdown(spec)
    plain = LLM(**common)
    plain_outs, plain_s = _generate(plain, req["prompts"], params)
    _shutdown(plain)
    per_prompt = []
    for s, p in zip(spec_outs, plain_outs):
        m = s.spec_decode_metrics
        per_prompt.append({"tokens": list(s.token_ids), "greedy_tokens": list(p.token_ids),
                           "finish_reason": s.finish_reason,
                           "rounds": [[d, a] for d, a in zip(m.per_step_drafted, m.per_step_accepted)] if m else []})
    return {"vllm_version": vllm.__version__, "per_prompt": per_prompt, "counters": counters,
            "init_s": spec_init_s, "wall_s": spec_s, "baseline_wall_s": plain_s}


def main(argv: list[str]) -> int:
    request, result = Path(argv[0]), Path(argv[1])
    out = serve(json.loads(request.read_text()))
    tmp = result.with_name(result.name + ".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(result)
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import this module: keep work behind the guard
    sys.exit(main(sys.argv[1:]))
