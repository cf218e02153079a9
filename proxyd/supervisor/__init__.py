"""`proxyd serve --workers N`: a supervisor forking worker processes that share one client port.

The supervisor loads configuration and read-only data once, then forks; it restarts a worker that
dies, drains them all on SIGTERM and replaces them one by one on SIGHUP. It never serves a client
request itself: it is the hub the workers ask for shared limits and balances (without Redis), for
pushed state to fan out, and for their metrics at scrape time.
"""
