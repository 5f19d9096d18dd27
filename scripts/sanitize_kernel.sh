#!/usr/bin/env bash
# Builds the compiled CPU kernel with AddressSanitizer and UndefinedBehaviorSanitizer into a
# temporary copy of the repository and runs the kernel tests and a whole-model check against
# it. Fails on any test failure and on any sanitizer report (in pytest or in a child process).
#
#   scripts/sanitize_kernel.sh            # build, check the sanitized kernel is loaded, test
#   scripts/sanitize_kernel.sh --check    # only: toolchain, sources (from setup.py), copy
#   scripts/sanitize_kernel.sh -- -k d4   # extra arguments after -- go to pytest
#
# The sources, flags and output name come from setup.py's own Extension (setup.py runs with
# setuptools.setup replaced by a recorder), so a new csrc/*.cc listed there is built here too.
# The in-tree resnext_flax/nn/lowering/_cpu_direct.so is never touched. PYTHON and CXX
# override the interpreter and the compiler; KEEP=1 keeps the temporary copy.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
CXX=${CXX:-g++}
CHECK_ONLY=0
PYTEST_EXTRA=()
while (($#)); do
    case "$1" in
        --check) CHECK_ONLY=1 ;;
        --) shift; PYTEST_EXTRA=("$@"); break ;;
        *) echo "usage: $0 [--check] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
    esac
    shift
done

SANITIZE=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
          -O1 -g)

# --- the toolchain: the compiler's own sanitizer runtimes, preloaded into Python below
command -v "$CXX" >/dev/null || { echo "no C++ compiler ($CXX)" >&2; exit 1; }
LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBUBSAN=$("$CXX" -print-file-name=libubsan.so)
for lib in "$LIBASAN" "$LIBUBSAN"; do
    # -print-file-name echoes a bare name when the compiler has no such runtime
    [[ "$lib" == /* && -e "$lib" ]] || { echo "$CXX has no sanitizer runtime ($lib)" >&2; exit 1; }
done
echo "int main() { return 0; }" | "$CXX" -x c++ "${SANITIZE[@]}" -o /dev/null - \
    || { echo "$CXX cannot build with ${SANITIZE[*]}" >&2; exit 1; }

# --- the extension as setup.py declares it, as shell assignments
setup_vars=$(cd "$ROOT" && env -u RESNEXT_FLAX_NO_EXTENSION "$PYTHON" - <<'EOF'
import runpy
import shlex

import setuptools

recorded = {}
setuptools.setup = lambda **kwargs: recorded.update(kwargs)
runpy.run_path("setup.py")
extensions = recorded.get("ext_modules") or []
if len(extensions) != 1:
    raise SystemExit(f"setup.py declares {len(extensions)} extensions on this machine; "
                     "this script builds exactly one")
(ext,) = extensions
flags = [*ext.extra_compile_args, *(f"-I{d}" for d in ext.include_dirs),
         *(f"-D{k}" if v is None else f"-D{k}={v}" for k, v in ext.define_macros)]
link = [*ext.extra_link_args, *(f"-l{lib}" for lib in ext.libraries)]
print(f"OUTPUT={shlex.quote(ext.name.replace('.', '/') + '.so')}")
for var, values in (("SOURCES", ext.sources), ("FLAGS", flags), ("LINK", link)):
    print(f"{var}=({shlex.join(values)})")
EOF
)
eval "$setup_vars"
for src in "${SOURCES[@]}"; do
    [[ -f "$ROOT/$src" ]] || { echo "setup.py lists $src, which does not exist" >&2; exit 1; }
done
echo "sources: ${SOURCES[*]}"
echo "output:  $OUTPUT"

# --- a copy of the repository's files (tracked, and untracked ones git does not ignore: the
# working tree as it is, without build outputs such as the in-tree .so)
COPY=$(mktemp -d "${TMPDIR:-/tmp}/resnext-sanitize.XXXXXX")
if [[ "${KEEP:-0}" == 1 ]]; then
    echo "keeping $COPY"
else
    trap 'rm -rf "$COPY"' EXIT
fi
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$COPY"
[[ ! -e "$COPY/$OUTPUT" ]] || { echo "the copy already holds $OUTPUT" >&2; exit 1; }
if ((CHECK_ONLY)); then
    echo "check passed: toolchain, ${#SOURCES[@]} sources, repository copied"
    exit 0
fi

# --- the sanitized build (the sanitizer flags come last: their -O1 -g override setup's)
start=$SECONDS
(cd "$COPY" && "$CXX" -shared -fPIC "${FLAGS[@]}" "${SANITIZE[@]}" "${SOURCES[@]}" \
    -o "$OUTPUT" "${LINK[@]}")
echo "built $OUTPUT with ${SANITIZE[*]} in $((SECONDS - start)) s"
# Instrumented code calls into both runtimes: without these symbols the flags did not apply.
symbols=$(nm -D "$COPY/$OUTPUT")  # not piped into grep -q: pipefail would see nm's SIGPIPE
grep -q ' U __asan_report_' <<<"$symbols" \
    || { echo "$OUTPUT has no AddressSanitizer instrumentation" >&2; exit 1; }
grep -q ' U __ubsan_handle_' <<<"$symbols" \
    || { echo "$OUTPUT has no UndefinedBehaviorSanitizer instrumentation" >&2; exit 1; }

# --- the tests, in the copy, with the runtimes preloaded (Python itself is not instrumented,
# so the runtimes must be loaded before anything else for ASan to intercept malloc; preloaded,
# ASan's link-order check holds, and jaxlib and torch need no other option)
REPORTS="$COPY/sanitizer-reports"
mkdir -p "$REPORTS"
export PYTHONPATH="$COPY"
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
# detect_leaks=0: Python and jaxlib keep memory allocated until exit by design.
# abort_on_error / halt_on_error: the first report kills the process, so pytest cannot pass.
# log_path: ASan's reports also land in files, which catches one in a child process whose
# exit status a test does not check. UBSan (GCC's libubsan next to ASan) ignores log_path and
# writes to stderr: pytest runs with --capture=sys so that C-level stderr reaches the log
# scanned below instead of a capture file lost when the process halts.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# Skips would hide an unloaded kernel; check it is the sanitized copy that is loaded.
(cd "$COPY" && "$PYTHON" - "$COPY" <<'EOF'
import pathlib
import sys

from resnext_flax.nn.lowering import kernel

copy = pathlib.Path(sys.argv[1]).resolve()
assert kernel._LIBRARY.is_relative_to(copy), f"{kernel._LIBRARY} is not in the copy {copy}"
assert kernel.available(), f"the sanitized kernel is not usable: {kernel.unavailable_reasons()}"
print(f"loaded {kernel._LIBRARY}")
EOF
)

shopt -s nullglob
TESTS=(tests/test_cpu_kernels.py)
for f in "$COPY"/tests/test_*kernel*.py "$COPY"/tests/test_*stem*.py; do
    f=${f#"$COPY"/}
    [[ " ${TESTS[*]} " == *" $f "* ]] || TESTS+=("$f")
done
# The whole-model checks run every kernel entry point (direct 3x3 convs, the 1x1 GEMM with its
# epilogues, the fusion boundary) in real networks, next to torchvision's outputs.
TESTS+=("tests/test_performance_paths.py::test_folded_model_matches_model_and_torchvision"
        "tests/test_performance_paths.py::test_prepared_blocked_kernels_compute_the_same_conv"
        "tests/test_performance_paths.py::test_optimized_model_prepares_kernels_once")
echo "tests: ${TESTS[*]}"
start=$SECONDS
status=0
(cd "$COPY" && "$PYTHON" -m pytest -q -n 0 -p no:cacheprovider --capture=sys "${TESTS[@]}" \
    ${PYTEST_EXTRA[@]+"${PYTEST_EXTRA[@]}"}) 2>&1 | tee "$COPY/pytest.log" || status=$?
echo "tests ran in $((SECONDS - start)) s (exit status $status)"
reports=("$REPORTS"/*)
for r in ${reports[@]+"${reports[@]}"}; do echo "=== $r"; cat "$r"; done
if ((${#reports[@]})) || grep -Eq 'runtime error:|ERROR: AddressSanitizer' "$COPY/pytest.log"
then
    echo "FAILED: a sanitizer report (above)" >&2
    exit 1
fi
if ((status)); then
    echo "FAILED: the tests failed under the sanitizers (exit status $status)" >&2
    exit "$status"
fi
echo "passed: no sanitizer report, all tests passed"
