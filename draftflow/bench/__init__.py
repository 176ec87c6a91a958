"""Benchmarks that measure DraftFlow components beside their same-run physical limits.

Each module here exposes one `run_*` function returning a JSON-ready dict and a
`print_table` for it; `benchmarks/` holds thin scripts and `draftflow bench` the CLI.
Results and how to read them are in docs/benchmarks.md.
"""
