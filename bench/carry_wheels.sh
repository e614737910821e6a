#!/usr/bin/env bash
# bench/carry_wheels.sh -- carry wheels too large for one call (DALI's is ~199 MB) to the lent GPU machine.
#
# A `run` call carries at most 64 MiB with the working tree, and the machine keeps its files only while warm
# (about 30 s after each call), so the pieces go over back-to-back calls into a folder outside the tree there:
#
#   here:                bench/carry_wheels.sh pack WHEEL_DIR PIECES_DIR
#                        (every file of WHEEL_DIR cut into <= 60 MB pieces, plus SHA256SUMS of the whole files)
#   there, each call:    bench/carry_wheels.sh stash PIECES_DIR/<piece> STASH_DIR   (carry one piece per call)
#   there, last call:    bench/carry_wheels.sh install STASH_DIR
#                        (joins the pieces, checks every file against SHA256SUMS, pip-installs the wheels with
#                        --no-index --no-deps; a missing piece or a checksum mismatch stops before pip runs)
#
# The wheels, with the dependencies the GPU image may lack (DALI 2.4 requires astunparse, gast, libcst, makefun,
# numpy, nvidia-libnvcomp-cu13, nvidia-nvimgcodec-cu13, nvtx, optree, packaging, six), for its Python 3.12:
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d WHEEL_DIR nvidia-dali-cuda130
# Checked end to end on a CPU machine with DALI 2.4.0's 199 MB wheel: 4 pieces, stashed, joined, checksum
# verified, installed into a fresh venv (tests/test_carry_wheels.py checks the same with small files).
#
# CARRY_PIECE_BYTES sets the piece size (default 60000000); PIP the installer (default: python -m pip).
set -euo pipefail

piece_bytes=${CARRY_PIECE_BYTES:-60000000}
usage="usage: bench/carry_wheels.sh pack WHEEL_DIR PIECES_DIR | stash PIECE STASH_DIR | install STASH_DIR"

pack() {  # pack WHEEL_DIR PIECES_DIR
  local wheels=$1 pieces=$2
  [ -d "$wheels" ] || { echo "carry_wheels: no folder $wheels" >&2; exit 2; }
  mkdir -p "$pieces"
  (cd "$wheels" && sha256sum -- *) > "$pieces/SHA256SUMS"
  for file in "$wheels"/*; do
    split -b "$piece_bytes" -d -a 3 -- "$file" "$pieces/$(basename "$file").part-"
  done
  echo "carry_wheels: $(ls "$pieces" | grep -c '\.part-') pieces and SHA256SUMS in $pieces"
}

stash() {  # stash PIECE STASH_DIR: copy one carried piece (or SHA256SUMS) out of the working tree
  mkdir -p "$2"
  cp -- "$1" "$2/"
  echo "carry_wheels: stashed $(basename "$1") ($(ls "$2" | wc -l) files in $2)"
}

install() {  # install STASH_DIR
  local stash joined
  stash=$(realpath "$1")
  [ -f "$stash/SHA256SUMS" ] || { echo "carry_wheels: $stash/SHA256SUMS was never stashed" >&2; exit 1; }
  joined=$(mktemp -d)
  while read -r _ name; do
    local parts=("$stash/$name".part-*)
    [ -e "${parts[0]}" ] || { echo "carry_wheels: no piece of $name in $stash" >&2; exit 1; }
    cat -- "${parts[@]}" > "$joined/$name"  # the glob sorts .part-000, .part-001, ...
  done < "$stash/SHA256SUMS"
  (cd "$joined" && sha256sum --quiet -c "$stash/SHA256SUMS") || {
    echo "carry_wheels: a joined file differs from its checksum (a piece is missing or damaged)" >&2; exit 1; }
  ${PIP:-python -m pip} install --no-index --no-deps "$joined"/*.whl
}

case "${1:-}" in
  pack) [ $# -eq 3 ] || { echo "$usage" >&2; exit 2; }; pack "$2" "$3" ;;
  stash) [ $# -eq 3 ] || { echo "$usage" >&2; exit 2; }; stash "$2" "$3" ;;
  install) [ $# -eq 2 ] || { echo "$usage" >&2; exit 2; }; install "$2" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
