# Sourced by run_all.sh and test.sh: create .venv if missing and install the project.
# Usage: source scripts/setup_venv.sh [EXTRAS]   e.g. "test"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
fi
SPEC="$ROOT"
[ -n "${1:-}" ] && SPEC="$ROOT[$1]"
# Reinstall only when pyproject.toml changed since the last install.
STAMP="$VENV/.zroute-installed-${1:-base}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "installing zroute into $VENV" >&2
  LOG="$VENV/install.log"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$SPEC" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "installation failed; the log above is in $LOG" >&2
    exit 1
  fi
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
