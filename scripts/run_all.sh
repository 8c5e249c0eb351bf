#!/usr/bin/env bash
# Set up .venv (if needed) and serve the whole stack on localhost:8000 with config.yaml.
# Extra arguments go to `zroute serve`, e.g. --port 9000 or --Backend.greeting=Hi; a -f of
# yours wins over the repository's config.yaml. It runs in your directory, so that your
# files (-f my.yaml, a policy as mymodule:Class) are found there.
set -euo pipefail
source "$(dirname "$0")/setup_venv.sh"
setup_venv
exec zroute serve -f "$REPO_ROOT/config.yaml" "$@"
