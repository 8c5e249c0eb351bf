# Sourced by run_all.sh and test.sh; defines setup_venv, which creates .venv if missing,
# installs the project, puts .venv/bin on PATH and sets REPO_ROOT to the repository's
# root. It stays in the caller's directory.
# Usage: source scripts/setup_venv.sh; setup_venv [EXTRAS]   e.g. "test"
# A function, so that it sees its own arguments: a sourced file without arguments
# would see the caller's ("--port 9000") as its own.
setup_venv() {
  local root venv spec stamp log
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  REPO_ROOT="$root"
  venv="$root/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    python3 -m venv "$venv"
  fi
  spec="$root"
  [ -n "${1:-}" ] && spec="$root[$1]"
  # Reinstall only when pyproject.toml changed since the last install.
  stamp="$venv/.zroute-installed-${1:-base}"
  if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "installing zroute into $venv" >&2
    log="$venv/install.log"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check -e "$spec" >"$log" 2>&1; then
      cat "$log" >&2
      echo "installation failed; the log above is in $log" >&2
      exit 1
    fi
    touch "$stamp"
  fi
  export PATH="$venv/bin:$PATH"
}
