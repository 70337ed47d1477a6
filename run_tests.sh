#!/usr/bin/env bash
# The whole test suite on one Python: installs what it needs, then runs the Node tests and pytest.
#   bash run_tests.sh                  # with python3 on PATH
#   PYTHON=/path/to/python bash run_tests.sh
# Browser tests need Debian's chromium (apt-get install -y chromium); without it they are skipped
# with a reason. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian's chromium for the browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "!! could not install chromium: browser tests will be skipped"
fi

echo "== installing Python packages into $("$PYTHON" -c 'import sys; print(sys.executable)')"
"$PYTHON" -m pip install -q --disable-pip-version-check -r requirements-dev.txt || exit 1
"$PYTHON" -c 'import mitmproxy.version, sys; print(f"== Python {sys.version.split()[0]}, mitmproxy {mitmproxy.version.VERSION}")'

status=0
if command -v npm >/dev/null 2>&1; then
  # The official Coze JS SDK (@coze/api) and what drives it, for tests/test_node_sdk.py and the browser bundle.
  echo "== npm packages for the JS SDK tests (tests/js)"
  if [ -f tests/js/package-lock.json ]; then npm_cmd=ci; else npm_cmd=install; fi
  (cd tests/js && npm "$npm_cmd" --no-audit --no-fund --loglevel=error) \
    || { echo "!! npm $npm_cmd failed in tests/js: the @coze/api tests cannot run"; status=1; }
else
  echo "!! npm not found: the @coze/api tests will be skipped"
  status=1
fi

if command -v node >/dev/null 2>&1; then
  echo "== node --test tests/js/"
  node --test tests/js/ || status=1
else
  echo "!! node not found: the userscript tests did not run"
  status=1
fi

echo "== pytest"
"$PYTHON" -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "!! pytest collected no tests: that is a failure here"
  rc=1
fi
[ $rc -ne 0 ] && status=$rc
exit $status
