"""The draft card: `draftflow.json` beside an exported draft's `config.json`.

It says what the draft was trained for and on, so that a draft is never evaluated or
served against the wrong target by accident: the target's identity and config hash,
the tokenizer's and chat template's hashes, the trained layers in both conventions
(outputs of layers, as DraftFlow captures them, and inputs to layers) with what
config.json writes for each engine, whether each engine serves a draft of the
target's family as trained (`serving`, from `families.py`), the data hash, the DraftFlow version, the
final-step metrics, and every evaluation run on it since (`record_evaluation`).

`draftflow evaluate` checks the card against the target it is given (`check_card`)
and refuses a mismatch naming the field; a draft without a card (exported before
cards existed, or by another tool) is evaluated with a warning.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import xxhash

import draftflow
from draftflow.fsutil import write_atomic

CARD_NAME = "draftflow.json"
CARD_FORMAT = "draftflow-draft-card"
CARD_VERSION = 1

log = logging.getLogger("draftflow.card")


def chat_template_hash(tok) -> str | None:
    template = getattr(tok, "chat_template", None)
    return None if template is None else "xxh3_128:" + xxhash.xxh3_128_hexdigest(str(template).encode())


def target_section(hf_config, provenance: dict, tok) -> dict:
    """The card's `target` and `tokenizer` facts known when training starts; kept in the
    checkpoint meta so that `draftflow export --checkpoint` writes the same card."""
    return {
        "target": {"identity": provenance["target"], "config_hash": provenance["target_config_hash"],
                   "model_type": getattr(hf_config, "model_type", None),
                   "num_hidden_layers": hf_config.num_hidden_layers, "hidden_size": hf_config.hidden_size,
                   "vocab_size": hf_config.vocab_size},
        "tokenizer": {"hash": provenance["tokenizer_hash"], "chat_template_hash": chat_template_hash(tok)},
    }


def build_card(meta: dict, final_metrics: dict | None) -> dict:
    """A card from a checkpoint's meta (draft config, provenance, card facts)."""
    prov = meta.get("provenance") or {}
    facts = meta.get("card") or {}
    draft = meta.get("draft_config") or {}
    return {
        "format": CARD_FORMAT, "version": CARD_VERSION, "draftflow_version": draftflow.__version__,
        "target": facts.get("target") or {"identity": prov.get("target"),
                                          "config_hash": prov.get("target_config_hash")},
        "tokenizer": facts.get("tokenizer") or {"hash": prov.get("tokenizer_hash")},
        "data_hash": prov.get("data_hash"),
        "feature_dtype": prov.get("feature_dtype"),
        "layers": {"trained_outputs": list(draft.get("aux_layer_ids") or [])},
        "eagle31": {"norm_before_fc": bool(draft.get("norm_before_fc")),
                    "norm_output": bool(draft.get("norm_output"))},
        "training": {"step": meta.get("step"), "final_metrics": final_metrics},
        "evaluations": [],
    }


def finish_card(card: dict, config: dict) -> dict:
    """Add what config.json writes for each engine, and whether each engine serves a
    draft of this target family as trained (`families.py`); export calls this."""
    from draftflow.families import engine_support

    trained = card["layers"]["trained_outputs"]
    card = {**card, "layers": {
        "trained_outputs": trained,
        "as_layer_inputs": [i + 1 for i in trained],
        "config_json": {
            "vllm": {"key": "eagle_aux_hidden_state_layer_ids", "reads_as": "layer inputs",
                     "value": config["eagle_aux_hidden_state_layer_ids"]},
            "sglang": {"key": "eagle_config.eagle_aux_hidden_state_layer_ids",
                       "value": config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]},
        }},
        "serving": engine_support((card.get("target") or {}).get("model_type"))}
    return card


def card_from_checkpoint(checkpoint_dir: Path, meta: dict) -> dict:
    """The card of a checkpoint `<run>/checkpoints/step_N`: its meta plus the run's
    metrics line of step N, when the run folder has one."""
    metrics = Path(checkpoint_dir).parent.parent / "metrics.jsonl"
    final = None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("step") == meta.get("step"):
                    final = record
    return build_card(meta, final)


def read_card(draft_dir: str | Path) -> dict | None:
    """The card of an exported draft, or None (with a warning) when it has none."""
    path = Path(draft_dir) / CARD_NAME
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        log.warning("draft %s has no %s (exported before draft cards, or by another tool): the target "
                    "and tokenizer it was trained for cannot be checked", draft_dir, CARD_NAME)
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"draft card {path}: unreadable ({e})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        found = f"format {card.get('format')!r}" if isinstance(card, dict) else "not a JSON object"
        raise ValueError(f"draft card {path}: not a DraftFlow draft card ({found}, expected format {CARD_FORMAT!r})")
    if card.get("version") != CARD_VERSION:
        raise ValueError(f"draft card {path}: version {card.get('version')!r} is not supported "
                         f"(this DraftFlow reads version {CARD_VERSION})")
    return card


def check_card(card: dict | None, draft_dir: str | Path, *, config_hash: str, tokenizer_hash: str,
               chat_template: str | None, aux_layer_ids) -> None:
    """Refuse to evaluate a draft against a target, tokenizer or layers it was not
    trained for; the error names the card field. Fields a card lacks are not checked."""
    if card is None:
        return
    path = Path(draft_dir) / CARD_NAME
    checks = (
        ("target.config_hash", card.get("target", {}).get("config_hash"), config_hash,
         "this draft was trained for another target"),
        # The template first: the tokenizer hash covers it too, so a template change would
        # otherwise be blamed on the tokenizer.
        ("tokenizer.chat_template_hash", card.get("tokenizer", {}).get("chat_template_hash"), chat_template,
         "the chat template (the tokenizer's own, or target.chat_template) differs from the one the draft was "
         "trained with"),
        ("tokenizer.hash", card.get("tokenizer", {}).get("hash"), tokenizer_hash,
         "the tokenizer given (target.tokenizer) differs from the one the draft was trained with"),
        ("layers.trained_outputs", card.get("layers", {}).get("trained_outputs"), list(aux_layer_ids),
         "the draft would read features of other layers (target.aux_layer_ids)"),
    )
    for field, want, got, why in checks:
        if want is not None and want != got:
            raise ValueError(f"draft card {path}: {field} is {want!r}, but the target given to evaluate "
                             f"has {got!r}; {why}")


def record_evaluation(draft_dir: str | Path, result: dict) -> None:
    """Append an evaluation result to the draft's card (atomically); no card, no record."""
    path = Path(draft_dir) / CARD_NAME
    card = read_card(draft_dir) if path.exists() else None
    if card is None:
        return
    entry = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    card["evaluations"] = [*card.get("evaluations", []), entry]
    write_atomic(path, (json.dumps(card, indent=2) + "\n").encode())
