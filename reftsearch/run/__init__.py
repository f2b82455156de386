"""Running a study: in this process or on Ray workers, progress lines, cost estimates, and
comparisons of two studies."""
