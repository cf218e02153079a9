"""`proxyd serve --workers N`: a supervisor forking worker processes that share one client port.

The supervisor loads configuration and read-only data once, then forks; it restarts a worker that
dies, drains them all on SIGTERM and replaces them one by one on SIGHUP. It never serves a client
request itself. Without Redis it maps the shared table the workers admit against on their own
(`table`), writes balances into it and keeps spend windows and sticky pins (`hub`); it fans
pushed state out and gathers the workers' metrics at scrape time.
"""
