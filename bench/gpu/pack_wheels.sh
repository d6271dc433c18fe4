#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (Python 3.12, x86-64 Linux) into .whl/ (ignored by git), one version
# of each, without dependencies, at the versions of constraints.txt; print the pack's size and the working tree's.
#
#   bash bench/gpu/pack_wheels.sh          # run from anywhere; needs pip and a package registry
#
# The list: the pinned stack, plus every distribution that it imports at run time and that the GPU machine's image
# does not have (/work/.library/device/KINDS.md, "Python packages already there"), or has at a version the pins
# cannot use (transformers 5.x, tokenizers 0.23, huggingface-hub 1.x, setuptools without pkg_resources). It was found
# by running `run_check.py --dry-run` here with every other distribution hidden (bench/gpu/README.md). torch,
# torchvision, numpy and the rest stay the GPU machine's own: install with `pip install --no-deps --target`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${WHEEL_DIR:-$REPO/.whl}"
LIMIT=$((64 * 1024 * 1024))

PACKAGES=(
  # the pinned stack
  mosaicml llm-foundry mosaicml-streaming transformers tokenizers huggingface-hub
  setuptools       # llm-foundry imports pkg_resources (gone from setuptools 81)
  omegaconf
  # Composer and its CLI (mcli is imported by Composer's loggers)
  importlib-metadata coolname mosaicml-cli backoff gql graphql-core websockets ruamel.yaml questionary
  prompt-toolkit wcwidth validators
  # llm-foundry: datasets, mlflow (imported by its checkpointer), databricks, catalogue
  datasets dill multiprocess mlflow-skinny databricks-sdk google-auth cachetools cryptography cffi
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions gitpython gitdb smmap
  pydantic pydantic-core typing-inspection annotated-types sqlparse pytz platformdirs tenacity catalogue
  beautifulsoup4
  # mosaicml-streaming: the compressions it imports at load time (boto3 and the other object stores it imports
  # only when it downloads, which this check never does)
  brotli python-snappy cramjam zstd
)

# Where constraints.txt's version has no wheel for CPython 3.12 on x86-64 Linux: the nearest release that has one.
declare -A OVERRIDES=([zstd]=1.5.6.1)  # 1.5.7.2: no cp312 wheel; 1.5.7.3 and 1.5.6.2 are yanked

version_of() {  # exact version of $1 in constraints.txt (names compared case- and separator-insensitively)
  local want
  want="$(echo "$1" | tr 'A-Z_.' 'a-z--')"
  awk -F'==' -v want="$want" '!/^#/ && NF == 2 { n = tolower($1); gsub(/[_.]/, "-", n); if (n == want) print $2 }' \
    "$REPO/constraints.txt"
}

SPECS=()
for name in "${PACKAGES[@]}"; do
  version="${OVERRIDES[$name]:-$(version_of "$name")}"
  if [ -z "$version" ]; then echo "pack_wheels: $name is not pinned in constraints.txt" >&2; exit 1; fi
  SPECS+=("$name==$version")
done

rm -rf "$OUT"
mkdir -p "$OUT"
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT" "${SPECS[@]}" \
  2> >(grep -v "^WARNING: Location" >&2)

count="$(ls "$OUT"/*.whl | wc -l)"
if [ "$count" -ne "${#SPECS[@]}" ]; then
  echo "pack_wheels: $count wheels for ${#SPECS[@]} packages" >&2; exit 1
fi
pack="$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)"
cd "$REPO"
tree="$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null \
        | awk '$2 == "total" { s += $1 } END { print s + 0 }')"
echo "wheels: $count in $OUT, $pack bytes ($((pack / 1024 / 1024)) MiB)"
echo "working tree (tracked + untracked not ignored): $tree bytes ($((tree / 1024 / 1024)) MiB)"
echo "together: $((pack + tree)) of $LIMIT bytes ($(( (LIMIT - pack - tree) / 1024 / 1024 )) MiB left)"
if [ $((pack + tree)) -gt "$LIMIT" ]; then echo "pack_wheels: over the 64 MiB a call may carry" >&2; exit 1; fi
