#!/usr/bin/env bash
# Mutation testing of the broker's rules and the wire protocol (docs/TESTING.md): mutmut
# changes broker/core.py, broker/policies.py, broker/registry.py and zroute/protocol.py
# one token at a time and runs the fast in-memory tests that reach the changed function
# (pyproject.toml, [tool.mutmut]); a change that no test notices survives.
# Usage: scripts/mutation.sh [MINUTES]
#   At most MINUTES (default 60) on 2 processes (MUTATION_JOBS to change that). mutants/
#   keeps the results: a run stopped by the bound goes on where it stopped when run
#   again. Prints the score and every mutant that survived (`mutmut show NAME` shows one).
set -euo pipefail
source "$(dirname "$0")/setup_venv.sh"
setup_venv "test,mutation"
cd "$REPO_ROOT"

minutes="${1:-60}"
status=0
timeout --signal=INT --kill-after=60 "${minutes}m" \
  mutmut run --max-children "${MUTATION_JOBS:-2}" || status=$?
if [ "$status" -eq 124 ]; then
  echo "stopped after ${minutes} minutes: run this again to go on" >&2
elif [ "$status" -ne 0 ]; then
  exit "$status"
fi

mutmut export-cicd-stats >/dev/null
python - <<'EOF'
import json

stats = json.load(open("mutants/mutmut-cicd-stats.json"))
tested = stats["total"] - stats["skipped"]
caught = stats["killed"] + stats["timeout"]
print(f"mutation score: {100 * caught / max(tested, 1):.1f}% ({caught} of {tested} mutants "
      f"caught; {stats['survived']} survived, {stats['no_tests']} reached by no test, "
      f"{stats['suspicious']} suspicious)")
EOF
echo "not caught:"
mutmut results | grep -v ": not checked$" || true
