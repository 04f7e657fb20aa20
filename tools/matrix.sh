#!/usr/bin/env bash
# One point of the version matrix: a throwaway env under .venv-matrix/POINT, then the suite.
#   tools/matrix.sh latest [pytest args]   the newest releases pyproject.toml's ranges allow
#   tools/matrix.sh oldest [pytest args]   every requirement at its floor (tools/floors.py);
#                                          what they pull in resolves to the newest it allows
#   tools/matrix.sh pins [pytest args]     the newest releases, but PINS="torch==2.11.0 ..."
# PYTHON picks the interpreter (default python3), EXTRAS the extras (make passes both). The
# installed versions land in .venv-matrix/POINT.txt.
set -euo pipefail
end=${1:?usage: tools/matrix.sh latest|oldest|pins [pytest args]}
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=${EXTRAS:-dev,data,train,eval}
env=.venv-matrix/$end
start=$(date +%s)

rm -rf "$env"
mkdir -p .venv-matrix
"$python" -m venv "$env"
pip=("$env/bin/python" -m pip)
# A machine-wide pip constraint (this project's CI machines cap torch) would hold the newest
# releases back: the matrix tests the ranges themselves.
export PIP_CONSTRAINT=/dev/null
"${pip[@]}" install --quiet --upgrade pip
case $end in
  latest)
    "${pip[@]}" install --upgrade --upgrade-strategy eager -e ".[$extras]" ;;
  oldest)
    "$python" tools/floors.py ${extras//,/ } > "$env/floors.txt"
    "${pip[@]}" install --constraint "$env/floors.txt" -e ".[$extras]" ;;
  pins)
    printf '%s\n' ${PINS:?set PINS, e.g. PINS="torch==2.11.0 torchvision==0.26.0"} > "$env/pins.txt"
    "${pip[@]}" install --constraint "$env/pins.txt" -e ".[$extras]" ;;
  *)
    echo "tools/matrix.sh: unknown point '$end' (latest, oldest or pins)" >&2
    exit 2 ;;
esac
"${pip[@]}" install --no-deps -r requirements/reference.txt
"${pip[@]}" freeze --exclude-editable > ".venv-matrix/$end.txt"
installed=$(( $(date +%s) - start ))

echo "== $end: $("$env/bin/python" -V), installed in ${installed}s"
grep -iE '^(torch|torchvision|transformers|deepspeed|open.clip.torch|webdataset|numpy|accelerate)==' \
  ".venv-matrix/$end.txt"
# Deprecation warnings are listed, not errors (pyproject.toml's filterwarnings says why): read
# the summary for any raised by our calls.
OMP_NUM_THREADS=2 "$env/bin/python" -m pytest -q -p no:cacheprovider \
  -W default::DeprecationWarning -W default::FutureWarning "$@"
echo "== $end: suite passed; $(( $(date +%s) - start ))s in all"
