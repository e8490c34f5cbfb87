#!/usr/bin/env bash
# Rebuild the built-in model from scratch: fetch the data, train (builtin/moe.toml, seed 0), export in bf16
# into mixtral/data/builtin, and measure its held-out bits per character. About an hour on 2 CPU cores.
#   scripts/build_builtin.sh            (run from the repository root, with the package installed)
set -euo pipefail
bin=${MIXTRAL:-.venv/bin/mixtral}
py=${PYTHON:-.venv/bin/python}
scripts/fetch_shakespeare.sh data/shakespeare
"$bin" train --config builtin/moe.toml --force  # from scratch: replaces an earlier run in its out_dir
"$py" - <<'PY'
import torch, mixtral
model = mixtral.load_model("runs/shakespeare-moe/model", dtype=torch.bfloat16)
mixtral.save_model(model, "mixtral/data/builtin")
PY
"$bin" eval --checkpoint mixtral/data/builtin --text 'data/shakespeare/heldout/*.txt'
