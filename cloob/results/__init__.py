"""The results table (parquet parts under <store>/results/) and the `cloob results` report."""
