"""The benchmark scripts' cheap parts: P1's smoke mode end to end, P3's epoch accounting.

The Ray-based scripts' smoke modes (overhead, search_efficiency, real_data) take minutes and are
not run here; see benchmarks/BENCHMARKS.md.
"""

import subprocess
import sys

import pandas as pd

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import search_efficiency  # noqa: E402


def test_pipeline_smoke_prints_its_ratio():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline.py"), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GPU:" in done.stdout and "torch " in done.stdout  # the machine header
    assert "| test_resnet | 32 | 0 | 8 |" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("P1 ratio (worst configuration): ") and "target >= 0.90" in last


def write_progress(tune_dir, trial: str, rows: list[tuple[int, float, str]]) -> None:
    folder = tune_dir / f"trial_{trial}_1_train_lr=0.001_2026-01-01_00-00-00"
    folder.mkdir(parents=True)
    pd.DataFrame([{"epoch": epoch, "objective": objective, "timestamp": 1_700_000_000, "trial_id": trial,
                   "checkpoint_path": f"/x/train/{trial}/checkpoint_2026-01-01_00-00-{clock}"}
                  for epoch, objective, clock in rows]).to_csv(folder / "progress.csv", index=False)


def test_epochs_to_target_follow_completion_time_across_trials(tmp_path):
    tune = tmp_path / "tune"
    # Two trials running at once, all in the same whole second: only the checkpoint names order them.
    write_progress(tune, "aaaa", [(1, 0.10, "05.100000"), (2, 0.30, "05.300000"), (3, 0.50, "05.500000")])
    write_progress(tune, "bbbb", [(1, 0.20, "05.200000"), (2, 0.60, "05.400000"), (2, 0.60, "05.450000")])
    timeline = search_efficiency.ray_timeline(tmp_path)
    assert list(zip(timeline["trial"], timeline["epoch"])) == [("aaaa", 1), ("bbbb", 1), ("aaaa", 2),
                                                                ("bbbb", 2), ("aaaa", 3)]  # re-report dropped
    reached = search_efficiency.outcome(timeline, target=0.6 - 0.005)
    assert (reached.epochs_to_target, reached.reached, reached.epochs_total, reached.best) == (4, True, 5, 0.6)
    never = search_efficiency.outcome(timeline, target=0.9)
    assert (never.epochs_to_target, never.reached) == (5, False)


def test_epochs_are_ordered_by_when_they_were_reported(tmp_path):
    """In-trial runs have no Ray Train checkpoint names: fer-tune's `reported_at` orders epochs."""
    for trial, rows in {"aaaa": [(1, 0.1, 100.2), (2, 0.3, 101.7)], "bbbb": [(1, 0.2, 100.9), (2, 0.4, 101.1)]}.items():
        folder = tmp_path / "tune" / f"trial_{trial}_1_train_lr=0.001_2026-01-01_00-00-00"
        folder.mkdir(parents=True)
        pd.DataFrame([{"epoch": e, "objective": o, "timestamp": 100, "reported_at": t, "trial_id": trial}
                      for e, o, t in rows]).to_csv(folder / "progress.csv", index=False)
    timeline = search_efficiency.ray_timeline(tmp_path)
    assert list(zip(timeline["trial"], timeline["epoch"])) == [("aaaa", 1), ("bbbb", 1), ("bbbb", 2), ("aaaa", 2)]


def fake_experiment(work, name: str, backbone: str, accuracy: float, train_accuracy: float, val_f1: float,
                    epochs: int) -> None:
    import json

    from conftest import write_spec

    (work / name / "report").mkdir(parents=True)
    write_spec(work / name / "spec.yaml", model={"backbone": backbone, "dropout": 0.1})
    (work / name / "report" / "metrics.json").write_text(json.dumps({
        "expression": {"accuracy": accuracy, "f1_macro": accuracy, "kappa": 0.1},
        "ci95": {"expression": {"accuracy": [accuracy - 0.05, accuracy + 0.05]}},
        "train_accuracy": train_accuracy, "val": {"expression_f1": val_f1}, "best_epoch": 3, "epochs_run": epochs}))


def test_real_data_table_of_a_benchmark_run_in_pieces(tmp_path, capsys):
    import real_data

    fake_experiment(tmp_path, "recipe_efficientnet_b0", "efficientnet_b0", 0.30, 0.70, 0.3, 20)
    fake_experiment(tmp_path, "recipe_resnet50", "resnet50", 0.40, 0.80, 0.4, 20)
    assert real_data.main(["--table-only", "--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| recipe_resnet50 | resnet50 | 0.400 [0.350, 0.450] |" in printed and "+40.0 pts" in printed
    assert "P4 tuned vs the better recipe: not measured yet (missing: regularization_retrained)" in printed
    assert "P6 train - test gap of the tuned model: not measured yet" in printed

    fake_experiment(tmp_path, "regularization_retrained", "efficientnet_b0", 0.52, 0.60, 0.50, 20)
    fake_experiment(tmp_path, "resnet50_fix_retrained", "resnet50", 0.50, 0.58, 0.48, 20)
    fake_experiment(tmp_path, "regularization", "efficientnet_b0", 0.51, 0.61, 0.50, 40)
    assert real_data.main(["--table-only", "--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| regularization_retrained | efficientnet_b0 |" in printed and "| 20 | 60 |" in printed  # + its search
    assert "0.520 - 0.400 = +12.0 points (target >= +10: met)" in printed
    assert "resnet50 0.500 (resnet50_fix_retrained) / efficientnet_b0 0.520 (regularization_retrained) = 0.962" in printed
    assert "P6 train - test gap of the tuned model: +8.0 points (target <= 10: met)" in printed


def test_a_rerun_with_another_grace_reuses_random_search_only_when_it_ran_the_same_search(tmp_path):
    """`--random-from`: random search ignores ASHA's settings and TPE's start, so they alone may differ."""
    import argparse

    import pytest

    from fer_tune.specfile import load_spec

    spec_file = REPO / "search_spaces" / "quickstart.yaml"
    earlier, later = argparse.Namespace(grace=1, reduction_factor=3.0), argparse.Namespace(grace=3, reduction_factor=2.0)
    folder = tmp_path / "seed0" / "random"
    (folder / "report").mkdir(parents=True)
    (folder / "spec.yaml").write_text(load_spec(spec_file, [*search_efficiency.ray_sets("random", 0, earlier),
                                                            "search.searcher.startup_trials=10"]).to_yaml())
    write_progress(folder / "tune", "aaaa", [(1, 0.25, "05.100000"), (2, 0.5, "05.200000")])
    with pytest.raises(SystemExit, match="holds no finished random search"):
        search_efficiency.reused_random(spec_file, 0, tmp_path, later)

    (folder / "report" / "metrics.json").write_text("{}")
    timeline = search_efficiency.reused_random(spec_file, 0, tmp_path, later)
    assert list(timeline["objective"]) == [0.25, 0.5]
    (tmp_path / "seed1").symlink_to(tmp_path / "seed0")  # seed 0's search where seed 1's should be
    with pytest.raises(SystemExit, match=r"ran a different search \(search.searcher.seed: it ran 0, this run has 1\)"):
        search_efficiency.reused_random(spec_file, 1, tmp_path, later)
    shorter = tmp_path / "shorter.yaml"
    shorter.write_text(load_spec(spec_file, ["train.epochs=5"]).to_yaml())
    with pytest.raises(SystemExit, match=r"train.epochs: it ran 10, this run has 5"):
        search_efficiency.reused_random(shorter, 0, tmp_path, later)
