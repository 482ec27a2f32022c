"""Training and evaluating one model: the loop, the test evaluation, what training leaves behind
(checkpoints, best/, the one reader of a trained model), the teacher of distillation and the
runtimes of exported models. Nothing here knows about Ray or about commands."""
