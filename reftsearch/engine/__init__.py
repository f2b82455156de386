"""Training and scoring one trial (or a pack of trials) on the frozen model, fast: the
frozen-activation cache, the training loop, dev scoring."""
