"""Mooncake store benchmark (see draftflow/bench/store_mooncake.py); same as
`draftflow bench store --backend mooncake`."""

from draftflow.bench.store_mooncake import main

if __name__ == "__main__":
    main()
