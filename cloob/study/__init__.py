"""The paper's study as data: a study spec (spec.py) expands into cells, each an ordinary training
run (cells.py); the results table's rows of those runs give the statistics over seeds (stats.py)."""
