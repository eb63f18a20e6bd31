#!/usr/bin/env bash
# Do two commits train alike? Before runs of two commits go into one table (compare.py records the
# commit of every run), prime with MAML and MTL for a few steps and fine-tune on the MAML body at
# each commit, same seeds, one thread, and compare the weights' sha256. Bit-identical on one machine
# means the same training code path; a difference means: do not mix their runs.
#
#   bash experiments/same_training.sh f86d4c7 HEAD                         # ~3 min on one CPU core
#   WIKIANN_DIR=/data/wikiann bash experiments/same_training.sh A B
#   PEFT=prefix bash experiments/same_training.sh A B                          # the runs with prefix tuning
#
# Uses git worktrees under $TMPDIR (removed at the end) and the default model (converted once).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bash experiments/same_training.sh COMMIT_A COMMIT_B" >&2; exit 2; }
repo=$(git rev-parse --show-toplevel)
data=${WIKIANN_DIR:-$repo/../shared/data/wikiann}
[ -d "$data" ] || { echo "no data folder $data: set WIKIANN_DIR to a PAN-X folder" >&2; exit 2; }
data=$(cd "$data" && pwd)
work=$(mktemp -d)
trap 'for w in "$work"/tree-*; do git -C "$repo" worktree remove --force "$w" 2>/dev/null || true; done; rm -rf "$work"' EXIT
peft=${PEFT:-adapter}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # one thread: the same summation order at both commits
prime="--model e5-small --data-dir $data --tasks-per-step 2 --batch-size 8 --max-sentences 2000 --inner-steps 5
       --inner-lr 0.3 --outer-lr 5e-5 --peft $peft --source-lang en --priming-langs de,es --eval-every 100"
for c in "$1" "$2"; do
  tree=$work/tree-$c out=$work/out-$c
  git -C "$repo" worktree add --detach "$tree" "$c" >/dev/null 2>&1
  (cd "$tree"
   python meta_pretrain.py $prime --steps 2 --seed 1 --out "$out/maml" > "$out.log" 2>&1
   python meta_pretrain.py $prime --steps 3 --seed 3 --method mtl --out "$out/mtl" >> "$out.log" 2>&1
   python finetune_peft.py --data-dir "$data" --steps 5 --batch-size 16 --max-sentences 20000 --lr 1e-3 \
       --warmup 0.1 --eval-every 100 --dev-sentences 50 --init "$out/maml" --peft $peft --lang en --seed 0 \
       --out "$out/ft" >> "$out.log" 2>&1
   if python finetune_peft.py --help | grep -q -- --extra-langs; then   # multi-source fine-tuning, where it exists
     python finetune_peft.py --data-dir "$data" --steps 5 --batch-size 16 --max-sentences 20000 --lr 1e-3 \
         --warmup 0.1 --eval-every 100 --dev-sentences 50 --init e5-small --peft $peft --lang en --seed 0 \
         --extra-langs de,es --extra-sentences 2000 --out "$out/multi" >> "$out.log" 2>&1
   fi) || { echo "$c: a stage failed; its log: $out.log"; tail -3 "$out.log"; exit 1; }
done
same=0
for f in maml/model.safetensors mtl/model.safetensors ft/peft.safetensors multi/peft.safetensors; do
  [ -f "$work/out-$1/$f" ] && [ -f "$work/out-$2/$f" ] || { echo "$f  not at both commits"; continue; }
  a=$(sha256sum "$work/out-$1/$f" | cut -c1-16) b=$(sha256sum "$work/out-$2/$f" | cut -c1-16)
  [ "$a" = "$b" ] && verdict=same || { verdict=DIFFERENT; same=1; }
  echo "$f  $1 $a  $2 $b  $verdict"
done
exit $same
