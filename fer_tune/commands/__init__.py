"""One module per `fer-tune` command that is more than a call: train, evaluate, distill, export,
predict and `data faces` (the search is `fer_tune.search`)."""
