"""CLOOB/CLIP training library: data -> webdataset shards -> distributed training -> checkpoint
registry -> zero-shot results table. It never imports Prefect (flows/ orchestrates it) and runs
under bare torchrun.

Packages, each with its own map in its docstring:

    prepare/          preparing pretraining data (`cloob prepare`): spec rows -> img2dataset -> shards
    data/             reading shards for training and evaluation
    losses/           the contrastive losses: CLOOB, CLIP and the two ablation corners
    train/            the training loop and its parts (`python -m cloob.train`)
    run/              running a step apart from what it computes: torchrun supervised, content keys
    evaluate/         zero-shot evaluation, retrieval, diagnostics; the evaluation sets (evaluate/sets/)
    results/          the results table and the `cloob results` report
    registry/         the checkpoint registry, its aliases and promotion
    study/            studies: seeds, the ablation, Welch's t-test
    lock/             one writer per folder, local or on S3

Modules:

    cli.py            the computing commands (train, prepare, evaluate, results, registry, import); the
                      installed `cloob` is flows/cli.py, which adds demo, study and deploy
    config.py         typed recipes (recipes/*.yaml), overrides, the recipe hash and run name
    methods.py        the training methods, the one list of them (the paper's 2x2 grid)
    model.py          open_clip models by name, the tiny configs (model_configs/), inv_tau in logit_scale
    architectures.py  the architecture names, read from the config files without importing open_clip
    specfile.py       the shipped data_specs/ folder and reading a spec file
    storage.py        the one storage layer: a Location (folder or s3:// prefix), atomic writes
    storage_s3.py     every s3:// file system's time limits and retries
    storage_errors.py a store's failure (down, full, refused credentials) as one error
    errors.py         CloobError: the one error users see, a problem and its fix, exit 2
    names.py          names that become paths (study, spec, run, set, alias) are plain names
    safetext.py       text from an input made safe for a terminal message
    settings.py       numbers read from CLOOB_* environment variables, one parser and one error
    plain_data.py     checkpoints read as plain data only (weights_only), never code
    version.py        the code version recorded in checkpoints and results
"""
