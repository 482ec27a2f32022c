"""One module per `fer-tune` command: train, evaluate, distill, export, predict, report, and the
`data` tools faces and synth (the search, `fer-tune run`, is `fer_tune.search`)."""
