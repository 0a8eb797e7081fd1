#!/usr/bin/env bash
# Runs the README's "Your own data" commands exactly as written (the block between the
# `own-data` markers), on the bundled world models and GSM8K-shaped world problems, so the README
# stays true. Usage: scripts/own-data.sh [RETORT_BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/retort}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
ln -s "$(realpath "$bin")" "$work/bin/retort"
"$bin" world problems --gsm8k --per-level 6 --levels 1,2 --seed 1 --output "$work/train.jsonl"
"$bin" world problems --gsm8k --per-level 4 --levels 1,2 --seed 2 --output "$work/test.jsonl"
sed -n '/<!-- own-data:begin -->/,/<!-- own-data:end -->/p' README.md \
  | sed '1,2d;$d' | sed '$d' > "$work/commands.sh"
cd "$work"
PATH="$work/bin:$PATH" TEACHER=world:teacher STUDENT=world:student TRAIN=train.jsonl TEST=test.jsonl \
  RUN=run bash -euo pipefail commands.sh
test -s run/report.html
test -s run/provenance.jsonl
echo "own-data: the README commands ran on the world models ($(wc -l < run/selected.jsonl) selected traces)"
