"""The paper's study as data: a study spec (spec.py) expands into cells, each an ordinary training
run (cells.py); the results table's rows of those runs give the statistics over seeds (stats.py).

    spec.py      the study spec (data, recipe, methods, seeds, sweeps, sets, steps), validated
    cells.py     the cells: method x arch x swept point x seed, each an ordinary training run
    stats.py     mean and std over seeds, Welch's two-sided t-test (its t distribution computed here)
    summary.py   a study's numbers from the results table: per set and group, mean and std over seeds,
                 CLOOB against CLIP by Welch's t-test, accuracy against step, the diagnostics
    report.py    study.md, study.png, diagnostics.png and study.json
"""
