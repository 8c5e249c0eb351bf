#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_venv.sh"
setup_venv test
cd "$REPO_ROOT"
exec python -m pytest "$@"
