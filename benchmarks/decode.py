"""CPU decode/prefill benchmark: ours (bf16, int8, int4) against transformers (bf16), in one run.

    .venv/bin/python benchmarks/decode.py [--preset bench-791m] [--batch 1 8] [--runs 3] [--plot bench.png]

The same as `mixtral bench`; see mixtral/bench.py for what is measured and how.
"""

from mixtral.bench import main

if __name__ == "__main__":
    main()
