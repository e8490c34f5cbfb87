"""The real Mixtral 8x7B shape against llama.cpp on the same weights: the whole model at int4 against Q4_0 (a
model larger than this machine's RAM, used from the memory-mapped file), or a slice of its layers in bf16, int8
and int4 against BF16, Q8_0 and Q4_0.

    .venv/bin/python benchmarks/full_scale.py [--dir DIR] [--llama-bench PATH/llama-bench] [--rounds 2]
    .venv/bin/python benchmarks/full_scale.py --slice [--layers 4] [--llama-bench PATH/llama-bench]

The same as `mixtral bench --full-scale ...`; see mixtral/full_scale.py for what is written and measured.
llama.cpp is a benchmark dependency, never a runtime one: docs/performance.md says how to build its tools.
"""

from mixtral.full_scale import main

if __name__ == "__main__":
    main()
