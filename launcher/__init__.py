"""The parts of run_mitm.py, the one-command launcher (run_mitm.py reads as what it does, in order).

bootstrap  first of all: Python >= 3.11, and the project venv (.venv-3.X) when this interpreter lacks the
           requirements; standard library only, parseable by any Python (run_tests.py uses it too)
common  names, exit codes, the one-message error and how messages are printed
args    the command line: flags, --set pass-through, the refusals found from the arguments alone
plan    what to start, worked out offline: PAT, OAuth config, origins, mitmproxy options
check   --check: the config validated offline, then one real token exchange
ports   is the port free, and who holds it if not
runner  mitmdump/mitmweb as a child process: its output passed through, next steps, stopping it
browser --browser: the user's browser in a throwaway profile with the PAC and the CA trusted in it only
"""
