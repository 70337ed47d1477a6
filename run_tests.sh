#!/bin/sh
# Kept for habit: the test runner is run_tests.py (any OS; Windows: py run_tests.py).
exec python3 "$(dirname "$0")/run_tests.py" "$@"
