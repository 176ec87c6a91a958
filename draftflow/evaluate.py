"""`draftflow evaluate`: the real acceptance length of an exported draft against its target.

Greedy chain speculative decoding with exact verification (`speculative.py`) on prompt
sets (held-out conversations by default, HumanEval, CHAMP math, JSONL files:
data/prompt_sets.py) at one or more chain depths, checked against a plain greedy run of
the same target: `lossless` is true when every speculative output equals it token for
token. Each set also gets a recommended `num_speculative_tokens`
(`recommend_num_speculative_tokens`). The draft is read exactly as an
exported folder holds it (the serving layout), so a wrong name, shape or layer id here is
caught before a server would serve garbage.

Counting: `tau` = tokens produced per target forward of the speculative loop (accepted
drafts plus the target's token). The prefill forward, which produces the first new token
in both plain and speculative decoding, is not part of tau, but is counted in
`target_forwards` and `baseline_forwards` alike. The last round drafts no more tokens
than the budget `max_new_tokens` has left, and EOS ends a prompt early, so a short
budget lowers tau slightly.

Precision: the target runs on capture.device, in float32 unless capture.dtype names
another dtype ("auto" means float32 here, on a GPU too). In float32 speculative and plain
greedy agree token for token. In bf16 a (depth+1)-token verify forward and a one-token
forward round differently, so on near-ties the two pick different argmaxes and `lossless`
is often False with no bug at all (seen on a tiny random target: 7 of 8 prompts diverged);
both runs always use the same dtype, so the comparison is fair either way.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open

from draftflow.speculative import Generation, greedy_generate, speculative_generate
from draftflow.train.model import DraftModelConfig, Eagle3Draft

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


# ---------------------------------------------------------------- the exported draft

def load_exported_draft(draft_dir: str | Path, embed_weight: torch.Tensor,
                        aux_layer_ids: Sequence[int] | None = None) -> Eagle3Draft:
    """An `Eagle3Draft` (float32, CPU) from an exported folder plus the target's embedding.

    Strict: `model.safetensors` must hold exactly the served tensor names with the shapes
    the config implies. The draft must fit the target: its vocab and hidden sizes must
    match `embed_weight` [V, H], and its aux layers `aux_layer_ids` when given.
    """
    draft_dir = Path(draft_dir)
    cfg = read_draft_config(draft_dir / "config.json")
    vocab, hidden = embed_weight.shape
    _check_fits_target(draft_dir / "config.json", cfg, vocab, hidden, aux_layer_ids)
    draft = Eagle3Draft(cfg)
    state = _read_draft_tensors(draft_dir / "model.safetensors", draft)
    with torch.no_grad():
        draft.load_state_dict(state, strict=False)  # embed_tokens comes from the target:
        draft.embed_tokens.weight.copy_(embed_weight.detach().to("cpu", torch.float32))
    return draft.float().eval().requires_grad_(False)


def read_draft_config(path: Path) -> DraftModelConfig:
    """Map a serving `config.json` (see export.serving_config) back to a DraftModelConfig."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"draft {path.parent}: no config.json (expected an exported draft folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"draft config {path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"draft config {path}: expected a JSON object")
    if EAGLE3_ARCHITECTURE not in (raw.get("architectures") or []):
        raise ValueError(f"draft config {path}: architectures is {raw.get('architectures')!r}, "
                         f"expected [{EAGLE3_ARCHITECTURE!r}]")
    if raw.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"draft config {path}: num_hidden_layers={raw['num_hidden_layers']}, "
                         "an EAGLE3 draft has exactly 1")

    def need(key: str, kind: type | tuple, source: dict = raw, where: str = ""):
        value = source.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = "a number" if isinstance(kind, tuple) else kind.__name__
            raise ValueError(f"draft config {path}: {where}{key} is {value!r}, expected {expected}")
        return value

    eagle = need("eagle_config", dict)
    # The trained layer outputs: vLLM's top-level key holds layer inputs (outputs + 1,
    # see export.py); drafts exported without it hold outputs in eagle_config's.
    if "eagle_aux_hidden_state_layer_ids" in raw:
        key, ids, shift = "eagle_aux_hidden_state_layer_ids", raw["eagle_aux_hidden_state_layer_ids"], 1
    else:
        key, ids, shift = "eagle_config.eagle_aux_hidden_state_layer_ids", need(
            "eagle_aux_hidden_state_layer_ids", list, eagle, "eagle_config."), 0
    if (not isinstance(ids, list) or len(ids) != 3
            or not all(isinstance(i, int) and not isinstance(i, bool) and i - shift >= 0 for i in ids)):
        raise ValueError(f"draft config {path}: {key} is {ids!r}, expected 3 layer ids"
                         + (" of 1 or more (layer inputs)" if shift else ""))
    aux_ids = [i - shift for i in ids]
    flags = {}
    for flag, value in (("norm_before_fc", eagle.get("norm_before_fc", raw.get("norm_before_fc", False))),
                        ("norm_output", raw.get("norm_output", False))):
        if not isinstance(value, bool):
            raise ValueError(f"draft config {path}: {flag} is {value!r}, expected true or false")
        flags[flag] = value
    hidden, heads = need("hidden_size", int), need("num_attention_heads", int)
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ValueError(f"draft config {path}: rope_scaling is {scaling!r}, expected an object or null")
    rope = {"rope_type": "default", **scaling, "rope_theta": float(need("rope_theta", (int, float)))}
    return DraftModelConfig(
        hidden_size=hidden, intermediate_size=need("intermediate_size", int),
        num_attention_heads=heads, num_key_value_heads=need("num_key_value_heads", int),
        head_dim=raw.get("head_dim") or hidden // heads, vocab_size=need("vocab_size", int),
        draft_vocab_size=need("draft_vocab_size", int),
        target_hidden_size=raw.get("target_hidden_size") or hidden,
        rms_norm_eps=float(need("rms_norm_eps", (int, float))), rope_parameters=rope,
        max_position_embeddings=need("max_position_embeddings", int), aux_layer_ids=tuple(aux_ids), **flags)


def _check_fits_target(path: Path, cfg: DraftModelConfig, vocab: int, hidden: int,
                       aux_layer_ids: Sequence[int] | None) -> None:
    if cfg.vocab_size != vocab:
        raise ValueError(f"draft config {path}: vocab_size={cfg.vocab_size}, but the target's vocab "
                         f"has {vocab} tokens; this draft was trained for another target")
    for key in ("target_hidden_size", "hidden_size"):
        if getattr(cfg, key) != hidden:
            raise ValueError(f"draft config {path}: {key}={getattr(cfg, key)}, but the target's "
                             f"hidden size is {hidden}; this draft was trained for another target")
    if aux_layer_ids is not None and list(cfg.aux_layer_ids) != list(aux_layer_ids):
        raise ValueError(f"draft config {path}: trained on the outputs of layers "
                         f"{list(cfg.aux_layer_ids)}, but the target's aux layers are "
                         f"{list(aux_layer_ids)} (target.aux_layer_ids or the EAGLE3 default); "
                         "the draft would read features of the wrong layers")


def _read_draft_tensors(path: Path, draft: Eagle3Draft) -> dict[str, torch.Tensor]:
    from draftflow.export import export_names

    served = export_names(draft.cfg)
    expected = {name: t for name, t in draft.state_dict().items() if name in served}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            missing = [n for n in served if n not in names]
            unknown = sorted(names - set(served))
            if missing or unknown:
                raise ValueError(f"draft weights {path}: missing tensors {missing}, unknown tensors "
                                 f"{unknown}; expected exactly {list(served)}")
            state = {name: f.get_tensor(name) for name in served}
    except FileNotFoundError:
        raise ValueError(f"draft {path.parent}: no model.safetensors") from None
    except (OSError, SafetensorError) as e:
        raise ValueError(f"draft weights {path}: unreadable ({e})") from None
    for name, want in expected.items():
        got = state[name]
        if got.shape != want.shape:
            raise ValueError(f"draft weights {path}: tensor {name!r} has shape {list(got.shape)}, "
                             f"config.json implies {list(want.shape)}")
        if got.is_floating_point() != want.is_floating_point() or (not want.is_floating_point()
                                                                   and got.dtype != want.dtype):
            raise ValueError(f"draft weights {path}: tensor {name!r} has dtype {got.dtype}, expected {want.dtype}")
    target_ids = torch.arange(len(state["d2t"])) + state["d2t"]
    if len(target_ids) and not (0 <= int(target_ids.min()) and int(target_ids.max()) < len(state["t2d"])):
        raise ValueError(f"draft weights {path}: d2t maps draft ids outside the target vocab "
                         f"of {len(state['t2d'])}")
    return {name: t.float() if t.is_floating_point() else t for name, t in state.items()}


# ---------------------------------------------------------------- evaluation on prompt sets

@dataclass(frozen=True, slots=True)
class EvalPrompts:
    prompts: list[list[int]]  # each ends where the first assistant turn's content begins
    eos_ids: tuple[int, ...]


def heldout_prompts(cfg, num_prompts: int, tok=None) -> EvalPrompts:
    """The first `num_prompts` held-out conversations of `cfg.data`, each cut before its
    first assistant token (so a prompt ends with the assistant header); see
    data/prompt_sets.py for how the split is reproduced."""
    from draftflow.data.prompt_sets import load_prompt_set
    from draftflow.roles import target_tokenizer

    tok = tok if tok is not None else target_tokenizer(cfg)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    return EvalPrompts(prompts=load_prompt_set("heldout", cfg.data, tok, num_prompts).prompts,
                       eos_ids=tuple(sorted(eos)))


def per_position(rounds: list[tuple[int, int]], depth: int) -> tuple[list, list[int], list[int]]:
    """(per_depth, accepted_per_pos, drafted_per_pos) of (drafted, accepted) rounds, for
    j = 1..depth (see `summarize`); shared with the vLLM comparison (engines/vllm.py)."""
    per_depth = []
    for j in range(1, depth + 1):
        # Depth j is reached when j tokens were drafted and the first j-1 accepted.
        reached = [a for d, a in rounds if d >= j and a >= j - 1]
        per_depth.append(sum(a >= j for a in reached) / len(reached) if reached else None)
    return (per_depth, [sum(a >= j for _, a in rounds) for j in range(1, depth + 1)],
            [sum(d >= j for d, _ in rounds) for j in range(1, depth + 1)])


def summarize(generations: list[Generation], baselines: list[list[int]], depth: int) -> dict:
    """Acceptance figures of speculative runs, checked against plain greedy outputs.

    `per_depth` is conditional: of the rounds that drafted j tokens and accepted the first
    j-1, the share that accepted the j-th. `accepted_per_pos` is unconditional (vLLM's
    `spec_decode_num_accepted_tokens_per_pos`): the number of rounds whose j-th drafted
    token was accepted; `drafted_per_pos` the number of rounds that drafted a j-th token.
    """
    rounds = [r for g in generations for r in g.rounds]
    produced = sum(r.produced for r in rounds)
    per_depth, accepted_per_pos, drafted_per_pos = per_position([(r.drafted, r.accepted) for r in rounds], depth)
    mismatched = [i for i, (g, b) in enumerate(zip(generations, baselines)) if g.tokens != b]
    target_forwards = sum(g.target_forwards for g in generations)
    baseline_forwards = sum(len(b) for b in baselines)  # one forward per greedy token
    return {
        "tau": produced / len(rounds) if rounds else None,
        "per_depth": per_depth,
        "mean_accepted": sum(r.accepted for r in rounds) / len(rounds) if rounds else None,
        "accepted_per_pos": accepted_per_pos,
        "drafted_per_pos": drafted_per_pos,
        "rounds": len(rounds),
        "target_forwards": target_forwards,
        "baseline_forwards": baseline_forwards,
        "forwards_saved": baseline_forwards - target_forwards,
        "lossless": not mismatched,
        "mismatched_prompts": mismatched,
        "new_tokens": sum(len(g.tokens) for g in generations),
    }


def evaluate_sweep(cfg, draft_dirs: dict[str, str | Path], prompt_sets: Sequence[str] = ("heldout",),
                   depths: Sequence[int] = (5,), max_new_tokens: int = 64, num_prompts: int = 16,
                   per_prompt: bool = False) -> dict[str, dict[str, dict]]:
    """Evaluate drafts of one target on prompt sets (data/prompt_sets.py) at chain depths.

    The target, each set's prompts and its plain greedy baseline are computed once for all
    drafts and depths. Returns {draft name: {set name: {"source", "num_prompts",
    "skipped_malformed", "skipped_too_long", "depths": {depth: row}, "recommendation"}}},
    a row being `summarize`'s figures plus the settings; every row is recorded on its
    draft's card. `per_prompt` adds each prompt's output tokens and rounds ([drafted,
    accepted] per verify forward) to the rows, for a comparison with a serving engine.
    """
    from draftflow.capture.capture import resolve_device_dtype
    from draftflow.capture.target import load_target, resolve_aux_layer_ids, target_eos_ids
    from draftflow.data.prompt_sets import load_prompt_set
    from draftflow.roles import target_hf_config, target_tokenizer

    depths = sorted(set(depths))
    for name, value in [*(("depth", d) for d in depths), ("max_new_tokens", max_new_tokens),
                        ("num_prompts", num_prompts)]:
        if value < 1:
            raise ValueError(f"evaluate: {name}={value}, expected at least 1")
    if not depths or not prompt_sets:
        raise ValueError("evaluate: expected at least one depth and one prompt set")
    tok = target_tokenizer(cfg)
    # Room in the context for the prompt, the new tokens and the last round's full chain.
    context = target_hf_config(cfg).max_position_embeddings
    max_prompt_tokens = context - max_new_tokens - depths[-1]
    if max_prompt_tokens < 1:
        raise ValueError(f"evaluate: max_new_tokens={max_new_tokens} plus depth {depths[-1]} fill the "
                         f"target's context of {context} tokens; no prompt fits")
    sets = [load_prompt_set(spec, cfg.data, tok, num_prompts, max_prompt_tokens)
            for spec in dict.fromkeys(prompt_sets)]
    device, dtype = resolve_device_dtype(cfg.capture)
    if cfg.capture.dtype == "auto":
        dtype = torch.float32  # exact greedy agreement; bf16 diverges on near-ties (module doc)
    target = load_target(cfg.target, device, dtype)
    aux_ids = resolve_aux_layer_ids(cfg.target, target.config.num_hidden_layers)
    check_cards(tok, target, aux_ids, draft_dirs)
    eos_ids = sorted(({tok.eos_token_id} - {None}) | target_eos_ids(target.config))
    embed = target.model.get_input_embeddings().weight
    drafts = {name: load_exported_draft(d, embed, aux_ids).to(device) for name, d in draft_dirs.items()}
    settings = {"target": target.identity, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "max_new_tokens": max_new_tokens, "aux_layer_ids": aux_ids, "eos_ids": eos_ids,
                "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cpus)"}
    results = {name: {} for name in drafts}
    for prompt_set in sets:
        for name, entry in _evaluate_set(target.model, drafts, aux_ids, eos_ids, prompt_set, depths,
                                         max_new_tokens, settings, per_prompt).items():
            results[name][prompt_set.name] = entry
            for row in entry["depths"].values():
                row["draft"] = str(draft_dirs[name])
                record_on_card(draft_dirs[name], row)
    return results


def _evaluate_set(model, drafts: dict[str, Eagle3Draft], aux_ids, eos_ids, prompt_set, depths: list[int],
                  max_new_tokens: int, settings: dict, per_prompt: bool) -> dict[str, dict]:
    """One prompt set: the plain greedy baseline once, then each draft at each depth."""
    start = time.perf_counter()
    baselines = [greedy_generate(model, p, max_new_tokens, eos_ids) for p in prompt_set.prompts]
    about = {"prompt_set": prompt_set.name, "num_prompts": len(prompt_set.prompts),
             "baseline_wall_s": time.perf_counter() - start, **settings}
    entries = {}
    for name, draft in drafts.items():
        rows = {}
        for depth in depths:
            start = time.perf_counter()
            gens = [speculative_generate(model, draft, aux_ids, p, max_new_tokens, depth, eos_ids)
                    for p in prompt_set.prompts]
            rows[depth] = {**summarize(gens, baselines, depth), **about, "depth": depth,
                           "wall_s": time.perf_counter() - start}
            if per_prompt:
                rows[depth]["per_prompt"] = [{"tokens": g.tokens, "rounds": [[r.drafted, r.accepted] for r in g.rounds]}
                                             for g in gens]
        entries[name] = {"source": prompt_set.source, "num_prompts": len(prompt_set.prompts),
                         "skipped_malformed": prompt_set.num_malformed, "skipped_too_long": prompt_set.num_too_long,
                         "depths": rows, "recommendation": recommend_num_speculative_tokens(rows[depths[-1]])}
    return entries


def evaluate_drafts(cfg, draft_dirs: dict[str, str | Path], depth: int = 5, max_new_tokens: int = 64,
                    num_prompts: int = 16, per_prompt: bool = False) -> dict[str, dict]:
    """Several drafts of one target on the same held-out prompts at one depth:
    {draft name: row} (see `evaluate_sweep`)."""
    sweep = evaluate_sweep(cfg, draft_dirs, ("heldout",), (depth,), max_new_tokens, num_prompts, per_prompt)
    return {name: sets["heldout"]["depths"][depth] for name, sets in sweep.items()}


def evaluate_prompt_sets(cfg, draft_dir: str | Path, prompt_sets: Sequence[str] = ("heldout",),
                         depths: Sequence[int] = (5,), max_new_tokens: int = 64, num_prompts: int = 16) -> dict:
    """One draft on each prompt set at each depth: what `draftflow evaluate` prints and
    writes (`--json`), {"version": 2, "draft", "depths", "prompt_sets": {name: ...}}."""
    sets = evaluate_sweep(cfg, {"draft": draft_dir}, prompt_sets, depths, max_new_tokens, num_prompts)["draft"]
    return {"version": 2, "draft": str(draft_dir), "depths": sorted(set(depths)), "prompt_sets": sets}


def check_cards(tok, target, aux_ids, draft_dirs: dict[str, str | Path]) -> None:
    """Refuse drafts whose card names another target, tokenizer, template or layers."""
    from draftflow.card import chat_template_hash, check_card, read_card
    from draftflow.data.tokenizer import tokenizer_hash

    for d in draft_dirs.values():
        check_card(read_card(d), d, config_hash=target.config_hash, tokenizer_hash=tokenizer_hash(tok),
                   chat_template=chat_template_hash(tok), aux_layer_ids=aux_ids)


def record_on_card(draft_dir: str | Path, result: dict, engine: str = "draftflow") -> None:
    """Keep the headline figures of an evaluation on the draft's card."""
    from draftflow.card import record_evaluation

    keys = ("prompt_set", "tau", "per_depth", "lossless", "depth", "max_new_tokens", "num_prompts", "dtype",
            "device", "machine")
    try:
        record_evaluation(draft_dir, {"engine": engine, **{k: result.get(k) for k in keys}})
    except OSError as e:  # a read-only draft folder: the evaluation still stands
        logging.getLogger("draftflow.evaluate").warning("could not record the evaluation on %s's card: %s",
                                                        draft_dir, e)


def evaluate(cfg, draft_dir: str | Path, depth: int = 5, max_new_tokens: int = 64,
             num_prompts: int = 16, per_prompt: bool = False) -> dict:
    """Acceptance length `tau` and losslessness of one exported draft (see the module doc)."""
    return evaluate_drafts(cfg, {"draft": draft_dir}, depth, max_new_tokens, num_prompts, per_prompt)["draft"]


def write_json(result: dict, path: str | Path) -> Path:
    """Write `result` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# A drafted position is worth drafting when it adds at least this many accepted tokens per
# round. Each chain step costs a draft forward (one decoder layer plus the draft's lm_head:
# for a 135M-parameter target about a tenth of a target forward, less for larger targets)
# and one more position in the verify forward; below one token in five rounds a step
# rarely pays for that. A rule of thumb, not a measurement of a serving engine.
MIN_ACCEPTED_PER_STEP = 0.2


def recommend_num_speculative_tokens(row: dict, threshold: float = MIN_ACCEPTED_PER_STEP) -> dict:
    """The chain length to serve with, from one evaluation row (the deepest measured).

    Drafting a j-th token gains, per round, the share of rounds whose j-th drafted token
    was accepted: a_j = accepted_per_pos[j] / drafted_per_pos[j] (accepting it needs
    tokens 1..j-1 accepted too, so a_j falls with j). The recommendation is the number of
    leading positions with a_j >= `threshold`, at least 1; when every measured position
    passes, deeper chains may pay too (`deeper_may_pay`).
    """
    rates = [a / d if d else None for a, d in zip(row["accepted_per_pos"], row["drafted_per_pos"])]
    num = 0
    while num < len(rates) and rates[num] is not None and rates[num] >= threshold:
        num += 1
    if num == len(rates):
        why = (f"every position up to the deepest measured ({num}) was accepted in at least {threshold:.0%} "
               f"of rounds; deeper chains may pay too (measure with --depths {num},{num + 2})")
    elif num == 0:
        first = "never drafted" if rates[0] is None else f"accepted in only {rates[0]:.0%} of rounds"
        why = f"even position 1 was {first} (under {threshold:.0%}): this draft gains little at any depth"
    else:
        nxt = "was never drafted" if rates[num] is None else f"in {rates[num]:.0%}"
        why = (f"positions 1-{num} were each accepted in at least {threshold:.0%} of rounds, "
               f"position {num + 1} {nxt}")
    return {"num_speculative_tokens": max(num, 1), "why": why, "threshold": threshold,
            "from_depth": row["depth"], "acceptance_per_position": rates, "deeper_may_pay": num == len(rates)}


def format_results(result: dict) -> str:
    """The printed form of `evaluate_prompt_sets`: one row per prompt set and depth, then
    each set's prompt counts and its recommendation."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    sets = result["prompt_sets"]
    width = max(10, *(len(name) for name in sets))
    lines = [f"{'prompt set':<{width}} {'depth':>5} {'tau':>6} {'fwd':>6} {'greedy':>6} {'lossless':>8}  "
             "acceptance per depth"]
    for name, entry in sets.items():
        for depth, r in entry["depths"].items():
            accept = " ".join(num(a, ".2f") for a in r["per_depth"])
            lines.append(f"{name:<{width}} {depth:>5} {num(r['tau'], '.3f'):>6} {r['target_forwards']:>6} "
                         f"{r['baseline_forwards']:>6} {str(r['lossless']):>8}  [{accept}]")
    any_r = next(iter(next(iter(sets.values()))["depths"].values()))
    lines.append(f"(up to {any_r['max_new_tokens']} new tokens per prompt, {any_r['device']} {any_r['dtype']}; "
                 "fwd: target forwards, prefill included; greedy: forwards of plain greedy decoding)")
    for name, entry in sets.items():
        skipped = [f"{n} {what}" for n, what in ((entry["skipped_malformed"], "malformed line(s)"),
                                                 (entry["skipped_too_long"], "too long for the context")) if n]
        lines.append(f"{name}: {entry['num_prompts']} prompts" + (f", skipped {', '.join(skipped)}" if skipped else ""))
    for name, entry in sets.items():
        rec = entry["recommendation"]
        lines.append(f"{name}: num_speculative_tokens={rec['num_speculative_tokens']} recommended; {rec['why']}")
    return "\n".join(lines)


def summary_lines(results: dict[str, dict]) -> list[str]:
    """Lines for `summary.print_summary(extra_lines=...)`: tau of each draft, in order."""
    r0 = next(iter(results.values()))
    taus = " -> ".join(f"{'-' if r['tau'] is None else format(r['tau'], '.2f')} {name}"
                       for name, r in results.items())
    lossless = "lossless" if all(r["lossless"] for r in results.values()) else "NOT lossless"
    return [f"  tau (depth {r0['depth']})      : {taus}",
            f"                       ({r0['num_prompts']} held-out prompts x {r0['max_new_tokens']} "
            f"new tokens, {lossless})"]


# ---------------------------------------------------------------- before / after training

def export_initial_draft(cfg, checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Export the draft a run started from (step 0: same config, vocab and seed as the
    checkpoint's run), to measure what training bought."""
    from draftflow.card import build_card
    from draftflow.export import export_draft
    from draftflow.train import checkpoint as ckpt
    from draftflow.train.trainer import build_draft, load_target_weights

    meta = ckpt.read_meta(Path(checkpoint_dir))
    model_cfg = DraftModelConfig.from_dict(meta["draft_config"])
    draft = build_draft(model_cfg, load_target_weights(cfg.target), meta["draft_ids"], cfg.train.seed)
    return export_draft(draft.state_dict(), model_cfg, out_dir, card=build_card({**meta, "step": 0}, None))


def evaluate_before_after(cfg, run, depth: int = 5, max_new_tokens: int = 64, num_prompts: int = 16) -> dict:
    """tau of a finished run's draft before training (step 0) and after (`run.final_dir`).

    `run` is a `roles.RunResult`; the untrained draft is exported to
    `<run.output_dir>/untrained`. Returns {"untrained": result, "trained": result}.
    """
    untrained = export_initial_draft(cfg, run.checkpoint, Path(run.output_dir) / "untrained")
    return evaluate_drafts(cfg, {"untrained": untrained, "trained": run.final_dir}, depth,
                           max_new_tokens, num_prompts)
