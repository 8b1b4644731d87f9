"""Tools around the mainline: sweeps, the benchmark, and the reporting helpers they share.

Nothing in the mainline (minispatial/*.py) imports from here."""
