"""The Optuna side: the study and its storage, the objective, pruners, warm starts, seed
reruns, the final test score, and what a trial records."""
