"""The study file: a YAML file read into validated dataclasses, and the search space.

Nothing here imports torch: ``reftsearch validate`` and the bad-input checks of every command
run in well under a second.
"""

from reftsearch.spec.study_file import StudySpec, load_spec, parse_spec

__all__ = ["StudySpec", "load_spec", "parse_spec"]
