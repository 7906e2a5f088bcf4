#!/usr/bin/env bash
# Install the framework integrations (editable) with their test dependencies and run their
# tests, package by package, then run the framework examples on a random checkpoint.
#
#   bash integrations/run_tests.sh              # install, test, run the examples
#   M3_SKIP_INSTALL=1 bash integrations/run_tests.sh   # already installed: only test
#   M3_SKIP_EXAMPLES=1 bash integrations/run_tests.sh  # skip the examples
#
# Extra arguments go to every pytest call (e.g. -x, -k name). torch is never installed here:
# m3connect needs it, and the user (or CI) chooses the build (CPU, CUDA, ROCm) beforehand.
# M3CONNECT_TEST_CHECKPOINT may name a real checkpoint folder to test with instead of the tiny
# random one the tests build.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-python3}"

PACKAGES=(
    "langchain"
    "llamaindex/llama-index-embeddings-m3connect"
    "llamaindex/llama-index-vector-stores-m3connect"
    "llamaindex/llama-index-retrievers-m3connect"
)

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "torch is not installed: install the build you want first (e.g. the CPU wheel), then rerun" >&2
    exit 2
fi

if [ "${M3_SKIP_INSTALL:-0}" != "1" ]; then
    args=()
    # m3connect itself (the integrations depend on it; it is not on PyPI): editable, unless
    # it is installed already (`make install` does that).
    if ! "$PYTHON" -c "import importlib.metadata as m; m.version('m3connect')" 2>/dev/null; then
        args+=(-e "$ROOT")
    fi
    args+=(
        -e "$HERE/langchain[test]"
        -e "$HERE/llamaindex/llama-index-embeddings-m3connect[test]"
        -e "$HERE/llamaindex/llama-index-vector-stores-m3connect[test]"
        -e "$HERE/llamaindex/llama-index-retrievers-m3connect[test]"
    )
    # Build with the setuptools already here when it is recent enough (no download needed).
    if "$PYTHON" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)" 2>/dev/null; then
        args+=(--no-build-isolation)
    fi
    echo "+ pip install ${args[*]}"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "${args[@]}" || exit $?
    # LlamaIndex's Milvus store pins pymilvus < 3, langchain-milvus 0.4 needs pymilvus 3: one
    # environment cannot satisfy both pins, and the LlamaIndex store runs on pymilvus 3 (the
    # drop-in tests prove it), so it is installed without its dependencies (all present).
    echo "+ pip install --no-deps llama-index-vector-stores-milvus"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
        "llama-index-vector-stores-milvus>=1.2,<2" || exit $?
fi

failed=()
for package in "${PACKAGES[@]}"; do
    echo
    echo "=== $package"
    (cd "$HERE/$package" && "$PYTHON" -m pytest -q -p no:cacheprovider "$@")
    rc=$?
    # 5: no tests collected, which here means the suite did not load.
    if [ $rc -ne 0 ]; then
        failed+=("$package (pytest exit $rc)")
    fi
done

if [ "${M3_SKIP_EXAMPLES:-0}" != "1" ]; then
    for example in langchain_rag.py llamaindex_retriever.py langchain_qdrant_hybrid.py \
        langchain_milvus_hybrid.py llamaindex_qdrant_hybrid.py llamaindex_milvus_hybrid.py; do
        echo
        echo "=== examples/$example (random checkpoint)"
        if ! (cd "$ROOT" && "$PYTHON" "examples/$example" random); then
            failed+=("examples/$example")
        fi
    done
fi

echo
if [ ${#failed[@]} -ne 0 ]; then
    printf 'integration tests FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "integration tests passed"
