"""The benchmark's machinery, split by concern; bench/bench.py is the entry point that ties it together.

# Layout
- `procs`: child processes (own process group, one log, stopped as a whole) and waiting for a socket.
- `proc_stats`: what /proc says about a process tree: CPU time, resident memory, the machine's busy time.
- `servers`: the servers under test (uWSGI, oxwsgi, the floor, the design prototypes), their command
  lines, nginx in front of them, and the readiness check.
- `load`: the load generators (wrk, uwsgi_load, a sequential HTTP client) and strace.
- `results`: what one run measured, and the metrics the report reads from it.
- `scenarios`: the traffic shapes and how one run of each is measured.
- `report`: medians, ratios and the Markdown report.
- `tools`: finding and snapshotting the binaries, and the environment the report starts with.
"""
