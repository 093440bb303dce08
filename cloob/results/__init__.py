"""The results table (parquet parts under <store>/results/) and the `cloob results` report.

    schema.py     the table's columns
    table.py      immutable parquet parts, one per append, published atomically; reading the rows
    outcomes.py   per-image outcomes beside each row, for paired comparisons (promotion's bootstrap)
    paper.py      the paper's published zero-shot numbers (paper_zero_shot.csv)
    arrange.py    the report's tables: datasets x checkpoints, retrieval, diagnostics
    render.py     the tables as text and markdown; images embedded as data: URIs
    figure.py     results.png: a bar per checkpoint and set, chance and the paper's numbers marked
    training.py   the runs' training curves' data, from each run's metrics.jsonl
    curves.py     training*.png
    report.py     `cloob results`: the report built, rendered and written
"""
