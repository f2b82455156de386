"""Reading a finished (or running) study: the best-trials table, the HTML report, the
dashboard."""
