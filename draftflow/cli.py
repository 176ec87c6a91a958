"""The `draftflow` command line. Config is parsed here, once, into typed records."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from draftflow.config import Config, config_warnings, load_config

log = logging.getLogger("draftflow")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", action="append", default=[], required=required, metavar="FILE",
                   help="YAML config; repeat to layer files (later wins)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=50")


def _config(args) -> Config:
    cfg = load_config(args.config, args.overrides)
    for warning in config_warnings(cfg):  # settings this run will not use, named once at load
        log.warning(warning)
    return cfg


def cmd_train(args) -> int:
    from draftflow.roles import run_role
    from draftflow.summary import print_summary

    from draftflow.train.distributed import shutdown

    cfg = _config(args)
    result = run_role(cfg, args.role)
    shutdown()  # on success only: a failed rank must not wait in a barrier for its peers
    if result.final_dir is not None:
        print_summary(cfg, result)
    elif args.role == "producer":
        print(f"producer: published {result.num_samples} samples ({result.num_tokens} tokens) to "
              f"{cfg.features.backend} store at {cfg.features.root}; manifest sealed")
    return 0


def cmd_prepare(args) -> int:
    from draftflow.data.prepare import save_prepared
    from draftflow.roles import plan_data, target_hf_config

    cfg = _config(args)
    plan = plan_data(cfg, target_hf_config(cfg).vocab_size)
    out = Path(args.out or Path(cfg.features.root) / "prepared.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_prepared(out, plan.prepared)
    tokens = sum(s.num_tokens for s in plan.prepared.train)
    print(f"prepared {len(plan.prepared.train)} training samples ({tokens} tokens) and "
          f"{len(plan.prepared.heldout)} held-out samples -> {out}")
    return 0


def cmd_regenerate(args) -> int:
    from draftflow.data.regenerate import regenerate

    cfg = _config(args)
    stats = regenerate(cfg, args.out, max_new_tokens=args.max_new_tokens, max_turns=args.max_turns,
                       batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens, workers=args.workers,
                       batch_tokens=args.batch_tokens)
    print(f"regenerated {stats.replies} replies ({stats.new_tokens} tokens) in {stats.regenerated} of "
          f"{stats.conversations} conversations in {stats.seconds:.0f} s -> {args.out}; train on it with "
          f"data.sources=[{args.out}]")
    return 0


def cmd_capture(args) -> int:
    from draftflow.capture.capture import resolve_device_dtype
    from draftflow.capture.parallel import plan_capture
    from draftflow.capture.target import load_target, resolve_aux_layer_ids
    import os

    from draftflow.roles import (build_provenance, open_colocated_store, plan_data, produce, refuse_memory_backend,
                                 target_hf_config)

    cfg = _config(args)
    refuse_memory_backend(cfg, "draftflow capture")
    hf_config = target_hf_config(cfg)
    plan = plan_data(cfg, hf_config.vocab_size)
    aux_ids = resolve_aux_layer_ids(cfg.target, hf_config.num_hidden_layers)
    provenance = build_provenance(cfg, hf_config, aux_ids, plan.tokenizer_hash, plan.data_hash)
    device, dtype = resolve_device_dtype(cfg.capture)
    # One process: capture.parallel none or pipeline (tp needs a torchrun producer);
    # checked before the store is opened, so a refused setting leaves no store record.
    capture_plan = plan_capture(cfg.capture, hf_config, 1, 0, device)
    store = open_colocated_store(cfg, provenance, os.environ)
    target = load_target(cfg.target, device, dtype, capture_plan)
    refs = produce(cfg, plan, store, target, aux_ids)
    store.close()
    print(f"captured {len(refs)} samples ({sum(r.num_tokens for r in refs)} tokens) into "
          f"{cfg.features.backend} store at {cfg.features.root}")
    return 0


def cmd_export(args) -> int:
    from draftflow.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported draft to {out}")
    return 0


def cmd_ingest(args) -> int:
    from draftflow.roles import run_ingest

    cfg = _config(args)
    result = run_ingest(cfg, Path(args.src))
    print(f"ingested {result.num_samples} samples ({result.num_tokens} tokens) from {args.src} into the "
          f"{cfg.features.backend} store at {cfg.features.root}; manifest sealed")
    return 0


def _store_secret(cfg) -> bytes:
    """The run secret, or (no secret configured) the key a colocated run made for the root."""
    import os

    from draftflow.control.binding import colocated_secret

    return colocated_secret(cfg.features, os.environ, create=False)


def cmd_store(args) -> int:
    from draftflow.stores import admin

    if args.action == "serve":
        return cmd_store_serve(args)
    cfg = _config(args)
    from draftflow.roles import refuse_memory_backend

    refuse_memory_backend(cfg, f"draftflow store {args.action}")
    root = Path(cfg.features.root)
    if args.action == "gc" and cfg.features.backend == "mooncake" and "all" in (args.what or []):
        from draftflow.control.binding import open_store_record
        from draftflow.stores import build_store

        # The run's data lives in Mooncake under a namespace only the secret names.
        keys, _ = open_store_record(root, _store_secret(cfg), None)
        store = build_store(cfg.features, keys)
        print(f"mooncake: removed {store.cleanup_run()} object(s) of this run")
        store.close()
    if args.action == "verify" and cfg.features.backend == "mooncake":
        return verify_mooncake(cfg)
    if args.action == "ls":
        summary = admin.list_store(root)
        print(f"store {root}\n  manifest : {summary.manifest_state} ({summary.num_refs} refs)\n"
              f"  samples  : {summary.num_samples} files, {summary.num_bytes / 2**20:.1f} MiB\n"
              f"  claims   : {summary.num_claims} held, {summary.num_done} done\n"
              f"  temp     : {summary.num_temp_files} leftover file(s)")
        return 0
    if args.action == "verify":
        problems = admin.verify_store(root, _store_secret(cfg))
        for p in problems:
            print(p)
        print(f"{root}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 0 if not problems else 1
    what = args.what or ["temp"]
    secret = None
    if "consumed" in what:
        secret = _store_secret(cfg)
    elif "claims" in what:  # checks the done markers where the secret is known
        try:
            secret = _store_secret(cfg)
        except ValueError:
            print(f"{root}: no run secret: done markers are taken as they are, not verified")
    removed = admin.gc_store(root, what, claim_timeout_s=cfg.features.claim_timeout_s, secret=secret)
    print(f"{root}: removed {removed}")
    return 0


def verify_mooncake(cfg) -> int:
    """Check the store record, the manifest chain and the done markers, then read back
    (and so check the signature and checksums of) every sample not consumed yet."""
    from draftflow.stores import StoreError, build_store
    from draftflow.stores.admin import check_run

    run = check_run(cfg.features.root, _store_secret(cfg))
    problems = run.problems
    refs = [r for r in run.refs if r.sample_id not in run.done]  # consume-once: trained and freed
    store = build_store(cfg.features, run.keys) if run.keys is not None else None
    try:
        for ref in refs if store is not None else []:
            try:
                store.release(store.get(ref))
            except StoreError as e:
                problems.append(str(e))
    finally:
        if store is not None:
            store.close()
    for p in problems:
        print(p)
    print(f"mooncake run of {cfg.features.root}: {len(refs)} refs, "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def cmd_store_serve(args) -> int:
    from draftflow.stores.mooncake_service import serve

    # Not _config: the server reads features.mooncake whatever features.backend says, so
    # the warnings about settings other backends ignore would be wrong here.
    cfg = load_config(args.config, args.overrides)
    if args.backend != "mooncake":
        raise ValueError(f"store serve --backend {args.backend}: only mooncake runs a server")
    return serve(cfg.features, args.config_out, args.host) or 0


def cmd_evaluate(args) -> int:
    from draftflow.evaluate import evaluate_prompt_sets, format_results, write_json

    cfg = _config(args)
    if args.engine == "vllm":  # DraftFlow's evaluator and real vLLM, side by side
        from draftflow.engines.vllm import evaluate_with_vllm, format_comparison

        if args.prompts != ["heldout"] or len(args.depths) != 1:
            raise ValueError(f"evaluate --engine vllm: compares on the heldout prompts at one depth; got "
                             f"--prompts {','.join(args.prompts)} --depths {','.join(map(str, args.depths))}")
        result = evaluate_with_vllm(cfg, args.draft, depth=args.depths[0], max_new_tokens=args.max_new_tokens,
                                    num_prompts=args.num_prompts)
        print(format_comparison(result))
    else:
        result = evaluate_prompt_sets(cfg, args.draft, args.prompts, args.depths, max_new_tokens=args.max_new_tokens,
                                      num_prompts=args.num_prompts)
        print(format_results(result))
    if args.json:
        write_json(result, args.json)
    return 0


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated values, none empty")
    return items


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers, e.g. 3,5,7") from None


def cmd_bench(args) -> int:
    if args.backend == "shared_dir":
        from draftflow.bench.store_shared_dir import print_table, run_store_benchmark

        import tempfile

        result = run_store_benchmark(args.root or tempfile.gettempdir(), args.samples, args.seq_len, args.hidden, json_out=args.json)
        print_table(result)
        return 0
    if args.backend == "mooncake":
        from draftflow.bench.store_mooncake import print_table, run_benchmark

        result = run_benchmark(args.seq_len, args.hidden, args.samples)
        print_table(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    raise ValueError(f"bench store --backend {args.backend}: expected shared_dir or mooncake")


def cmd_demo(args) -> int:
    from draftflow.demo import run_demo

    return run_demo(args.out, args.overrides, args.target)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftflow", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="prepare, capture, train and export (per --role)")
    _add_config_args(p)
    p.add_argument("--role", default="colocated", help="colocated | producer | consumer")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="tokenise the configured conversations")
    _add_config_args(p)
    p.add_argument("--out", help="prepared dataset file (default <features.root>/prepared.safetensors)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("regenerate", help="rewrite the training conversations' replies with the target's own")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="JSONL file to write (use it as data.sources)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--max-turns", type=int, default=1, help="user turns answered per conversation")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--batch-tokens", type=int, help="padded prompt tokens per generate call (long prompts "
                   "make smaller batches; default 65536)")
    p.add_argument("--max-prompt-tokens", type=int, help="leave longer prompts' replies as they are "
                   "(default data.max_length)")
    p.add_argument("--workers", type=int, help="processes, each with its own target (default: one per "
                   "visible GPU on CUDA, one on CPU)")
    p.set_defaults(func=cmd_regenerate)

    p = sub.add_parser("capture", help="run the target and write features to the store")
    _add_config_args(p)
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("export", help="export a checkpoint as an SGLang/vLLM EAGLE3 draft")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run's output_dir (latest)")
    p.add_argument("--out", required=True, help="destination folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ingest", help="publish existing feature files (DraftFlow or SpecForge .ckpt) into the store")
    _add_config_args(p)
    p.add_argument("--from", dest="src", required=True, help="folder of *.safetensors or *.ckpt feature files")
    p.set_defaults(func=cmd_ingest)

    store = sub.add_parser("store", help="inspect, verify, clean or serve a feature store")
    store_sub = store.add_subparsers(dest="action", required=True)
    for action, text in (("ls", "summarise a store: manifest state, samples, claims"),
                         ("verify", "check the manifest signatures and every sample's checksums"),
                         ("gc", "remove leftovers (temp files, stale claims, consumed samples) or everything"),
                         ("serve", "run a Mooncake master and segment holder in the foreground")):
        p = store_sub.add_parser(action, help=text)
        _add_config_args(p, required=False)
        if action == "gc":
            p.add_argument("--what", action="append", choices=["temp", "claims", "consumed", "all"],
                           help="what to remove (repeatable; default temp)")
        if action == "serve":
            p.add_argument("--backend", default="mooncake", help="the store to run (mooncake)")
            p.add_argument("--config-out", help="write the client config snippet here")
            p.add_argument("--host", default="127.0.0.1", help="address to serve on")
        p.set_defaults(func=cmd_store)

    p = sub.add_parser("evaluate", help="acceptance length (tau) of an exported draft with its real target")
    _add_config_args(p)
    p.add_argument("--draft", required=True, help="exported draft folder (config.json + model.safetensors)")
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--prompts", type=_comma_list, default=["heldout"], metavar="SET[,SET...]",
                   help="prompt sets, comma-separated: heldout (data's held-out split), humaneval, champ, "
                   "or a .jsonl file of prompts (default heldout)")
    p.add_argument("--depths", "--depth", type=_int_list, default=[5], metavar="N[,N...]",
                   help="chain draft lengths per round, comma-separated, e.g. 3,5,7 (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=16, help="prompts per set (heldout: at most data.num_heldout)")
    p.add_argument("--engine", choices=["draftflow", "vllm"], default="draftflow",
                   help="vllm: also serve the draft with real vLLM (the vllm extra) and print both")
    p.set_defaults(func=cmd_evaluate)

    bench = sub.add_parser("bench", help="benchmarks against their same-run physical limits")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    p = bench_sub.add_parser("store", help="feature store put/get throughput vs raw I/O")
    p.add_argument("--backend", default="shared_dir", help="shared_dir | mooncake")
    p.add_argument("--root", default=None, help="shared_dir: folder on the file system to measure")
    p.add_argument("--samples", type=int, default=16, help="samples (shared_dir) or timed rounds (mooncake)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="SmolLM2-135M-Instruct + ShareGPT subset, colocated, on CPU")
    p.add_argument("--out", default="./demo-run", help="folder for features, run and plots")
    p.add_argument("--target", choices=["smollm2", "gemma3"], default="smollm2",
                   help="the real target: SmolLM2-135M-Instruct (default) or Gemma 3 270M")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Long sequences need most of a card in a few large, short-lived blocks; without
    # expandable segments the caching allocator can hold ~10 GiB it cannot reuse, and a
    # 128k step that fits runs out of memory (docs/benchmarks.md). Read at CUDA start.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "urllib3", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from draftflow.control.manifest import ManifestError
    from draftflow.stores import StoreError

    try:
        return args.func(args) or 0
    except (ValueError, OSError, TimeoutError, StoreError, ManifestError) as e:
        # These carry a message written for the user (file, field, what was expected).
        print(f"draftflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
