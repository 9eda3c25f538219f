"""Applications: the command line and the study, built on the method registry."""
