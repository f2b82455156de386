"""Task data: splits read from files, hub datasets or built-in synthetic tasks."""
