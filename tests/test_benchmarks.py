"""The benchmark scripts' cheap parts: P1's smoke mode end to end, P3's epoch accounting.

The Ray-based scripts' smoke modes (overhead, search_efficiency, real_data) take minutes and are
not run here; see benchmarks/BENCHMARKS.md.
"""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, write_spec

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


def fake_experiment(work, name: str, backbone: str, correct: int, train_accuracy: float, val_f1: float,
                    epochs: int, faces: int = 100, pretrained=None) -> None:
    """An experiment folder as real_data.py reads it: `correct` of `faces` test faces right, the
    same faces (images f0..) for every experiment; and its second-test evaluation likewise."""
    import json

    import numpy as np

    from fer_tune import EXPRESSIONS

    def results(folder, right: int) -> None:
        folder.mkdir(parents=True)
        truth = np.arange(faces) % 7
        predicted = np.where(np.arange(faces) < right, truth, (truth + 1) % 7)
        table = {"image": [f"f{i}" for i in range(faces)], "expression": truth, "expression_pred": predicted}
        table.update({f"p_{n}": (predicted == k).astype(float) for k, n in enumerate(EXPRESSIONS)})
        pd.DataFrame(table).to_csv(folder / "test_predictions.csv", index=False)
        accuracy = right / faces
        (folder / "metrics.json").write_text(json.dumps({
            "expression": {"accuracy": accuracy, "f1_macro": accuracy, "kappa": 0.1},
            "ci95": {"expression": {"accuracy": [accuracy - 0.05, accuracy + 0.05]}}, "test_images": faces,
            "labels": list(range(7)), "train_accuracy": train_accuracy, "val": {"expression_f1": val_f1},
            "best_epoch": 3, "epochs_run": epochs}))

    results(work / name / "report", correct)
    results(work / f"{name}_second_test", correct)
    write_spec(work / name / "spec.yaml", model={"backbone": backbone, "dropout": 0.1, "pretrained": pretrained})
    (work / name / "best").mkdir()
    (work / name / "best" / "config.yaml").write_text((work / name / "spec.yaml").read_text())


def test_real_data_table_of_a_benchmark_run_in_pieces(tmp_path, capsys):
    import real_data

    fake_experiment(tmp_path, "recipe_efficientnet_b0", "efficientnet_b0", 30, 0.70, 0.3, 20)
    fake_experiment(tmp_path, "recipe_resnet50", "resnet50", 40, 0.80, 0.4, 20)
    assert real_data.main(["--table-only", "--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| recipe_resnet50 | resnet50 | none | 0.400 [0.350, 0.450] |" in printed and "+40.0 pts" in printed
    assert "P4 [imagenet] winner - better recipe: not measured yet (missing: pretrained)" in printed
    assert "P6 [scratch] train - test gap of the winner: not measured yet" in printed

    fake_experiment(tmp_path, "pretrained", "mobilenetv2_100", 60, 0.65, 0.55, 120, pretrained="imagenet")
    fake_experiment(tmp_path, "pretrained_tf_efficientnet_lite0", "tf_efficientnet_lite0", 58, 0.60, 0.50, 110)
    assert real_data.main(["--table-only", "--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| pretrained | mobilenetv2_100 | imagenet | 0.600 [0.550, 0.650] |" in printed and "| 120 |" in printed
    # the same 100 faces: the winner gets 20 more right and none fewer, so the paired interval is above 0
    assert "P4 [imagenet] pretrained - recipe_resnet50 on the test (100 faces): +20.0 points [+" in printed
    assert "McNemar p 1.9e-06 (target >= +10 with the interval above 0: met)" in printed
    assert "on the second test (100 faces): +20.0 points" in printed
    assert ("P5 [imagenet] weaker / stronger backbone after its own search: tf_efficientnet_lite0 0.580 "
            "(pretrained_tf_efficientnet_lite0) / mobilenetv2_100 0.600 (pretrained) = 0.967 (target >= 0.95: met)"
            in printed)
    assert "P6 [imagenet] train - test gap of pretrained's winner: +5.0 points (target <= 10: met)" in printed
    assert "P4 [scratch] winner - better recipe: not measured yet (missing: regularization)" in printed
    assert "P4 [scratch, resnet50_fix]: not measured yet" in printed

    # an arm's other shipped space gets its own paired lines, apart from the arm's main search
    fake_experiment(tmp_path, "resnet50_fix", "resnet50", 45, 0.90, 0.45, 200)
    assert real_data.main(["--table-only", "--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert ("P4 [scratch, resnet50_fix] resnet50_fix - recipe_resnet50 on the test (100 faces): +5.0 points [+"
            in printed)
    assert ("P6 [scratch, resnet50_fix] train - test gap of resnet50_fix's winner: +45.0 points "
            "(target <= 10: NOT met)" in printed)
    assert "P4 [scratch] winner - better recipe: not measured yet (missing: regularization)" in printed

    # a search given more trials in a copy of its folder (--extend) gets its own lines; its source keeps its own
    assert real_data.main(["--table-only", "--work", str(tmp_path), "--extend", "pretrained=24"]) == 0
    assert "P4 [imagenet, pretrained extended to 24 trials]: not measured yet" in capsys.readouterr().out
    fake_experiment(tmp_path, "pretrained_24", "mobilenetv2_100", 65, 0.70, 0.57, 180, pretrained="imagenet")
    assert real_data.main(["--table-only", "--work", str(tmp_path), "--extend", "pretrained=24"]) == 0
    printed = capsys.readouterr().out
    assert "| pretrained_24 | mobilenetv2_100 | imagenet | 0.650 [0.600, 0.700] |" in printed
    assert ("P4 [imagenet, pretrained extended to 24 trials] pretrained_24 - recipe_resnet50 on the test "
            "(100 faces): +25.0 points [+") in printed
    assert "P6 [imagenet, pretrained extended to 24 trials] train - test gap of pretrained_24's winner: +5.0" in printed
    assert "P4 [imagenet] pretrained - recipe_resnet50 on the test (100 faces): +20.0 points [+" in printed
    for bad in ("pretrained", "pretrained=", "=24", "pretrained=x"):
        with pytest.raises(SystemExit):
            real_data.main(["--table-only", "--work", str(tmp_path), "--extend", bad])

    # a search run again with changed values (--variant) gets its own row and lines beside it
    variant = ["--variant", "pretrained_gap", "pretrained", "search.gap_penalty={allowed: 0.1}"]
    assert real_data.main(["--table-only", "--work", str(tmp_path), *variant]) == 0
    assert ("P4 [imagenet, pretrained_gap: pretrained with search.gap_penalty={allowed: 0.1}]: not measured yet"
            in capsys.readouterr().out)
    fake_experiment(tmp_path, "pretrained_gap", "mobilenetv2_100", 55, 0.60, 0.50, 150, pretrained="imagenet")
    write_spec(tmp_path / "pretrained_gap" / "spec.yaml", model={"backbone": "mobilenetv2_100"},
               search={"gap_penalty": {"allowed": 0.1}})  # the values the variant ran with
    assert real_data.main(["--table-only", "--work", str(tmp_path), *variant]) == 0
    printed = capsys.readouterr().out
    assert "| pretrained_gap | mobilenetv2_100 | imagenet | 0.550 [0.500, 0.600] |" in printed
    assert "pretrained_gap - recipe_resnet50 on the test (100 faces): +15.0 points [+" in printed
    assert "train - test gap of pretrained_gap's winner: +5.0 points (target <= 10: met)" in printed
    assert "P4 [imagenet] pretrained - recipe_resnet50 on the test (100 faces): +20.0 points [+" in printed
    # the folder holds a search run with other values: its results are not shown under these
    other = ["--variant", "pretrained_gap", "pretrained", "search.gap_penalty={allowed: 0.2}"]
    assert real_data.main(["--table-only", "--work", str(tmp_path), *other]) == 0
    printed = capsys.readouterr().out
    assert "pretrained_gap holds a search with other values" in printed and "| pretrained_gap |" not in printed
    for bad in (["pretrained_gap", "pretrained"], ["pretrained", "pretrained", "train.lr=0.1"],
                ["pretrained_tf_efficientnet_lite0", "pretrained", "train.lr=0.1"], ["x", "pretrained", "lr"],
                ["x", "no_such_search", "train.lr=0.1"], ["..", "pretrained", "train.lr=0.1"],
                ["pretrained_second_test", "pretrained", "train.lr=0.1"], ["a/b", "pretrained", "train.lr=0.1"]):
        with pytest.raises(SystemExit):
            real_data.main(["--table-only", "--work", str(tmp_path), "--variant", *bad])
    for clash in (["--variant", "v", "pretrained", "train.lr=0.1", "--variant", "v", "pretrained", "train.lr=0.2"],
                  ["--variant", "pretrained_24", "pretrained", "train.lr=0.1", "--extend", "pretrained=24"]):
        with pytest.raises(SystemExit):
            real_data.main(["--table-only", "--work", str(tmp_path), *clash])


def test_a_reused_experiment_whose_shipped_spec_has_changed_since_is_named_with_the_fields(tmp_path, capsys):
    import yaml

    import real_data
    from fer_tune.specfile import read_spec

    spec = write_spec(tmp_path / "space.yaml")
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "spec.yaml").write_text(yaml.safe_dump(read_spec(spec, ["train.lr=0.01"]).model_dump(mode="json")))
    assert real_data.spec_changes(folder, spec, ["train.lr=0.01"]) == []
    # this command's settings go over both: another --cpus-per-trial, say, is not an edit of the file
    assert real_data.spec_changes(folder, spec, ["train.lr=0.02"]) == []
    write_spec(spec, model={"backbone": "resnet10t", "dropout": 0.3})  # the shipped file edited since
    assert real_data.spec_changes(folder, spec, ["train.lr=0.01"]) == ["model.dropout"]
    assert real_data.spec_changes(tmp_path / "never_ran", spec, []) == []
    # the table says so for a finished experiment it shows: a fake recipe's spec is not report_baseline.yaml's
    fake_experiment(tmp_path / "work", "recipe_resnet50", "resnet50", 40, 0.80, 0.4, 20)
    assert real_data.main(["--table-only", "--work", str(tmp_path / "work")]) == 0
    assert "note: recipe_resnet50 ran with a spec that report_baseline.yaml and these settings no longer give " \
           "(it differs in " in capsys.readouterr().out


def test_an_exported_winner_names_the_revisions_its_search_ran_at_not_the_exporting_one(tmp_path, capsys):
    import argparse
    import json

    import real_data
    import yaml

    fake_experiment(tmp_path, "pretrained", "mobilenetv2_100", 60, 0.65, 0.55, 120, pretrained="imagenet")
    day = 1_764_633_600  # 2025-12-02 00:00 UTC
    (tmp_path / "walls.json").write_text(json.dumps({"pretrained": [
        {"started": day + 3600, "seconds": 60.0, "revision": "aaaaaaa"},
        {"started": day + 90_000, "seconds": None, "revision": "bbbbbbb"},
        {"started": day + 95_000, "seconds": 60.0, "revision": "aaaaaaa"}]}))
    bench = real_data.Bench(argparse.Namespace(cpus_per_trial=2, arms=["imagenet"], export=tmp_path / "results",
                                               extend=[], variant=[]),
                            tmp_path, [], {b: b for b in real_data.SMOKE_NAMES})
    real_data.export_winners(bench)
    exported = (tmp_path / "results" / "pretrained.yaml").read_text()
    assert exported.startswith("# pretrained: the winner of benchmarks/real_data.py's imagenet arm (searched "
                               "2025-12-02 to 2025-12-03, fer-tune aaaaaaa, bbbbbbb).")
    assert yaml.safe_load(exported)["model"]["backbone"] == "mobilenetv2_100"
    assert "exported " in capsys.readouterr().err
    # exported again after every later search: an unchanged winner is neither rewritten nor announced
    before = (tmp_path / "results" / "pretrained.yaml").stat().st_mtime_ns
    real_data.export_winners(bench)
    assert "exported" not in capsys.readouterr().err
    assert (tmp_path / "results" / "pretrained.yaml").stat().st_mtime_ns == before
    # one piece that ran past midnight names both days
    (tmp_path / "walls.json").write_text(json.dumps({"pretrained": [
        {"started": day + 80_000, "seconds": 10_000.0, "revision": "ccccccc"}]}))
    assert real_data.provenance(tmp_path, "pretrained") == "2025-12-02 to 2025-12-03, fer-tune ccccccc"
    # an extended copy ran its source's pieces too
    (tmp_path / "pretrained_24").mkdir()
    (tmp_path / "pretrained_24" / real_data.EXTENDED_FROM).write_text("pretrained")
    walls = json.loads((tmp_path / "walls.json").read_text())
    walls["pretrained_24"] = [{"started": day + 200_000, "seconds": 600.0, "revision": "ddddddd"}]
    (tmp_path / "walls.json").write_text(json.dumps(walls))
    assert real_data.provenance(tmp_path, "pretrained_24") == "2025-12-02 to 2025-12-04, fer-tune ccccccc, ddddddd"
    assert real_data.wall_of(tmp_path, "pretrained_24") == "177 min (2 pieces)"


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


def test_gpu_check_smoke_shares_trials_and_its_search_is_a_valid_spec():
    """benchmarks/gpu.py's parts 1 and 3 are the P1 smoke above and `fer-tune run`; here its own
    part (trials sharing a device) runs end to end, and part 3's settings load as specs."""
    import argparse

    import gpu
    from fer_tune.specfile import load_spec, read_spec

    for smoke in (True, False):
        sets, _, _ = gpu.search_sets(argparse.Namespace(smoke=smoke, cpus=8.0, search_samples=32, search_epochs=10))
        (load_spec if smoke else read_spec)(REPO / "search_spaces" / "pretrained.yaml", sets)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--skip", "p1", "search",
                           "--concurrency", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 2 | 0.5 | 2 |" in done.stdout  # two trials at once, half a device each
    assert "sharing the GPU:" in done.stdout.strip().splitlines()[-1] and "[smoke]" in done.stdout


def test_a_variant_is_one_more_asha_tpe_arm_with_its_own_values_and_random_search_never_gets_them():
    import argparse

    import pytest

    label, values = search_efficiency.parse_variant("mv:search.searcher.multivariate=true,search.searcher.group=true")
    assert (label, values) == ("mv", ["search.searcher.multivariate=true", "search.searcher.group=true"])
    args = argparse.Namespace(grace=3, reduction_factor=3.0, variants={"asha_tpe:mv": values})
    assert search_efficiency.ray_sets("asha_tpe:mv", 0, args)[-2:] == values
    assert not set(values) & set(search_efficiency.ray_sets("random", 0, args) + search_efficiency.ray_sets(
        "asha_tpe", 0, args))
    for bad in ("mv", "mv:", ":search.searcher.group=true", "mv:search.searcher.group"):
        with pytest.raises(argparse.ArgumentTypeError):
            search_efficiency.parse_variant(bad)


def test_a_rerun_of_the_same_command_reuses_finished_arms_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    """P3 runs longer than a session: `--work` keeps each arm's search, and the same command again
    measures only what is missing (`fer-tune run --resume` where a search stopped half-way)."""
    import argparse

    from fer_tune.specfile import load_spec

    spec_file = REPO / "search_spaces" / "quickstart.yaml"
    args = argparse.Namespace(grace=3, reduction_factor=3.0, variants={})
    calls = []

    def fake_run_cli(command, log):
        calls.append([str(a) for a in command])
        out = Path(command[command.index("--out") + 1])
        sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.yaml").write_text(load_spec(spec_file, sets).to_yaml())
        if not (out / "tune").is_dir():
            write_progress(out / "tune", "aaaa", [(1, 0.25, "05.100000")])
        (out / "report").mkdir(exist_ok=True)
        (out / "report" / "metrics.json").write_text("{}")

    monkeypatch.setattr(search_efficiency, "run_cli", fake_run_cli)
    out = tmp_path / "seed0" / "asha_tpe"
    search_efficiency.run_ray("asha_tpe", spec_file, 0, out, args)
    assert len(calls) == 1 and "--resume" not in calls[0]

    timeline = search_efficiency.run_ray("asha_tpe", spec_file, 0, out, args)  # finished: reused as it is
    assert len(calls) == 1 and list(timeline["objective"]) == [0.25]

    (out / "report" / "metrics.json").unlink()  # as if stopped half-way
    search_efficiency.run_ray("asha_tpe", spec_file, 0, out, args)
    assert len(calls) == 2 and "--resume" in calls[1]

    search_efficiency.run_ray("asha_tpe", spec_file, 1, out, args)  # another search there: run afresh
    assert len(calls) == 3 and "--resume" not in calls[2] and "search.searcher.seed=1" in calls[2]


def test_every_committed_benchmark_config_is_a_complete_spec_fer_tune_train_can_read():
    """benchmarks/results/*.yaml are promised to retrain with `fer-tune train`: each one must stay a
    valid spec as the schema grows, name its data relative to the repository, and be complete (the
    exported best/config.yaml, not a partial one that defaults would silently fill)."""
    import yaml

    from fer_tune.specfile import read_spec

    files = sorted((REPO / "benchmarks" / "results").glob("*.yaml"))
    assert files
    for path in files:
        spec = read_spec(path)
        assert str(spec.data.root).startswith("../shared/data/"), path
        written = yaml.safe_load(path.read_text())
        assert written == spec.model_dump(mode="json"), f"{path.name}: not the complete exported config"
