"""`fer-tune run`: the search, one concern per module.

    space    the spec's space as Optuna sees it (define-by-run sampler, parameter names)
    trial    what runs in Ray for one trial (kept light: every trial actor imports it)
    cluster  joining or starting Ray, what fits on it, where checkpoints go
    results  the finished trials read back from Tune
    run      the driver: `run_search`, Ctrl-C, the test of the winner and its export

Nothing is imported here, so a trial actor that unpickles `fer_tune.search.trial` pays only for
what that module needs.
"""
