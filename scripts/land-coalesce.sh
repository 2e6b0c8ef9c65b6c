#!/usr/bin/env bash
# Run HERE after a GPU call of scripts/gpu-coalesce.sh or scripts/gpu-pause-record.sh: lands
# its record in the repository, for the card it ran on.
#   bash scripts/land-coalesce.sh FILES_AT        (the folder the device tool copied $OUT to)
# - finds the record (coalesce.tgz, or the coalesce/ folder a call that ran out of time left)
#   and, if the call had one, the variants (choose.tgz);
# - reads the card from the record's nvidia-smi output (H100 -> h100, H200 -> h200) and the
#   commit from its BUILD line;
# - unpacks them into bench/results/<card>/coalesce/<commit>/ (choose/ inside it);
# - writes that folder's coalesce.md (scripts/coalesce-table.py), and, as the card's current
#   record, bench/results/<card>/coalesce.json (scripts/coalesce-json.py) and coalesce.md;
# - prints the targets' lines.
# RESULTS (default bench/results) sets where. It never commits, and it refuses to overwrite a
# folder that exists.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
from=${1:?usage: land-coalesce.sh FILES_AT}
results=${RESULTS:-bench/results}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tgz=$(find "$from" -maxdepth 3 -name coalesce.tgz | head -1)
if [ -n "$tgz" ]; then
  tar xzf "$tgz" -C "$tmp"
  rec=$tmp/coalesce
else
  # A call that ran out of time leaves the record unpacked (scripts/gpu-coalesce.sh).
  rec=$(find "$from" -maxdepth 3 -type d -name coalesce | head -1)
  [ -n "$rec" ] || { echo "land-coalesce: no coalesce.tgz or coalesce/ under $from" >&2; exit 2; }
  echo "land-coalesce: no coalesce.tgz, landing the unpacked $rec (the call did not finish)"
fi
[ -f "$rec/env.txt" ] || { echo "land-coalesce: the record has no env.txt" >&2; exit 2; }
card=$(grep -oE "NVIDIA (H100|H200)" "$rec/env.txt" | head -1 | awk '{print tolower($2)}')
[ -n "$card" ] || { echo "land-coalesce: no H100 or H200 named in env.txt" >&2; exit 2; }
commit=$(sed -n 's/^commit \([0-9a-f]\{7\}\)[0-9a-f]*\(-dirty\)\{0,1\}$/\1\2/p' "$rec/env.txt" | head -1)
[ -n "$commit" ] || { echo "land-coalesce: no commit line in env.txt" >&2; exit 2; }
dest=$results/$card/coalesce/$commit
[ ! -e "$dest" ] || { echo "land-coalesce: $dest exists; move it away first" >&2; exit 2; }
mkdir -p "$(dirname "$dest")"
cp -r "$rec" "$dest"
choose=$(find "$from" -maxdepth 3 -name choose.tgz | head -1)
if [ -n "$choose" ]; then
  tar xzf "$choose" -C "$dest"
fi
echo "landed: $dest ($card, commit $commit)"
python3 scripts/coalesce-table.py "$dest" > "$dest/coalesce.md" 2> "$tmp/table.err" ||
  { echo "        no table: scripts/coalesce-table.py failed on it ($(tail -1 "$tmp/table.err"))"; rm -f "$dest/coalesce.md"; }
if [ -f "$dest/coalesce.md" ] && [ -f "$dest/coalesce-large.json" ] && [ -s "$dest/anchor-mq.txt" ]; then
  python3 scripts/coalesce-json.py "$dest" > "$results/$card/coalesce.json"
  cp "$dest/coalesce.md" "$results/$card/coalesce.md"
  echo "        $results/$card/coalesce.json, $results/$card/coalesce.md"
else
  echo "        not a whole record (a step is missing): $results/$card/coalesce.json is left as it was"
fi
# The targets, under each mode's heading.
[ -f "$dest/coalesce.md" ] && awk '/^### /{h=$0} /— (holds|MISSED)/{if(h!=""){print h; h=""} print}' "$dest/coalesce.md"
[ -f "$dest/choose/choice.txt" ] && { echo "variants:"; cat "$dest/choose/choice.txt"; }
exit 0
