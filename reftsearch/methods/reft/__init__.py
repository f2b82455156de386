"""ReFT: interventions on a layer's block output at the first and last prompt tokens."""
