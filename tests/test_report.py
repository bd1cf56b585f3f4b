"""fgic.report: the results table over seeds from run folders written by fgic's own RunLog, unfinished and failed
runs listed apart, the plot, and bad input."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch

from fgic import config, engine, report
from fgic.errors import FgicError
from fgic.jsonfile import write_json
from fgic.runlog import RunLog
from tests.helpers import REPO, fgic_env, optional


def make_run(root, dataset, seed, accs, epochs=None, finish=True, flags=(), ema=None, num_classes=None,
             test_total=100):
    """A run folder as fgic.ddp leaves it: config.json from the real parser, one record per epoch in `accs` (test
    top-1), and summary.json when `finish`. The dataset's classes: its official count (200 for another name)."""
    args = config.parse(["-d", dataset, "-s", str(seed), "--epochs", str(epochs or len(accs)), *flags])
    args.amp = engine.resolve_amp(args.amp, torch.device("cpu"))  # as fgic.ddp.resolve, on the CPU
    args.mean, args.std = list(args.mean or config.IMAGENET_MEAN), list(args.std or config.IMAGENET_STD)  # likewise
    folder = root / dataset / config.run_name(args)
    log = RunLog(folder, is_main=True)
    num_classes = num_classes or report.PUBLISHED_CLASSES.get(dataset, 200)
    log.start({**vars(args), "dataset": dataset, "num_classes": num_classes,
               "classes": [f"{i:03d}" for i in range(num_classes)]}, 0)
    for epoch, acc in enumerate(accs, 1):
        log.epoch({"epoch": epoch, "lr": 0.1 / epoch, "train_loss": 1.0 / epoch, "train_acc": acc + 5, "test_acc": acc,
                   "test_total": test_total})
    if finish:
        best = max(accs)
        log.write("summary.json", {"final_test_acc": accs[-1], "best_test_acc": best,
                                   "best_epoch": accs.index(best) + 1, "epochs": len(accs), "wall_seconds": 100.0,
                                   **({"ema_final_test_acc": ema[-1]} if ema else {})})
    return folder


def spread(values, n=True):
    tail = f" ({len(values)})" if n else ""
    if len(values) == 1:
        return f"{values[0]:.2f}{tail}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{tail}"


def results_table(text):
    """The first markdown table as {first cells joined by '/': {column: cell}} (config columns as the row key)."""
    lines = [line for line in text.split("\n## ")[0].splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    n_keys = sum(1 for h in head if not h.endswith(("final epoch", "(selected on the test set)")))
    return head[:n_keys], {"/".join(r[:n_keys]): dict(zip(head, r)) for r in rows}


def run_report(root):
    """The table fgic.report writes to RUNS_DIR/results.md."""
    assert report.main([str(root), "--no-plot"]) == 0
    return (root / "results.md").read_text()


def test_mean_and_sample_std_over_seeds_per_dataset_and_amp(tmp_path, capsys):
    finals = {("cub", "off"): [[80.0, 85.5], [81.0, 86.25], [79.0, 84.0]],
              ("cub", "bf16"): [[82.0, 85.0], [86.0, 84.5]],
              ("aircraft", "off"): [[90.0, 91.0], [92.0, 92.5]],
              ("cars", "off"): [[93.0, 92.0]]}
    for (dataset, amp), runs in finals.items():
        for seed, accs in enumerate(runs):
            make_run(tmp_path, dataset, seed, accs, flags=("-a", amp))
    text = run_report(tmp_path)
    assert capsys.readouterr().out == text  # printed and written alike
    keys, rows = results_table(text)
    assert keys == ["arch", "amp"]  # nothing else differs among these runs
    assert set(rows) == {"resnet50/off", "resnet50/bf16", "resnet50, published/"}
    for (dataset, amp), runs in finals.items():
        row = rows[f"resnet50/{amp}"]
        assert row[f"{dataset} final epoch"] == spread([accs[-1] for accs in runs])
        assert row[f"{dataset} best epoch (selected on the test set)"] == spread([max(a) for a in runs], n=False)
    assert rows["resnet50/bf16"]["aircraft final epoch"] == ""
    published = rows["resnet50, published/"]
    assert [published[f"{d} best epoch (selected on the test set)"] for d in ("cub", "aircraft", "cars")] == \
        ["86.74", "93.25", "94.09"]
    assert published["cub final epoch"] == ""
    assert "## Unfinished" not in text and "## Failed" not in text
    assert text.count("| cub | cub/resnet50-") == 5  # every finished run listed once


def test_groups_by_the_options_that_differ_and_only_shows_those(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, "birds", seed, [50.0 + seed, 60.0 + seed])
        make_run(tmp_path, "birds", seed, [40.0 + seed, 45.0, 55.0 + 2 * seed], flags=("-b", "32", "-n", "b32"))
    keys, rows = results_table(run_report(tmp_path))
    # the batch changes the lr (the rule) and the epochs differ; weights, crop etc. are alike and not shown
    assert keys == ["arch", "amp", "batch size", "epochs", "lr", "note"]
    assert set(rows) == {"resnet50/off/64/2/0.025/–", "resnet50/off/32/3/0.0125/b32"}
    assert rows["resnet50/off/64/2/0.025/–"]["birds final epoch"] == spread([60.0, 61.0])
    assert rows["resnet50/off/32/3/0.0125/b32"]["birds final epoch"] == spread([55.0, 57.0])
    assert not any(k.startswith("resnet50, published") for k in rows)  # birds has no published number


def test_recipes_get_a_table_each_with_only_what_varies_in_it(tmp_path):
    """A preset fills a dozen flags: one table per recipe, the options the same in all its runs named above it, and
    the EMA's final accuracy beside the model's (summary.json's ema_final_test_acc)."""
    for seed in (0, 1):
        make_run(tmp_path, "birds", seed, [50.0, 60.0 + seed])
        make_run(tmp_path, "birds", seed, [40.0, 70.0 + seed], flags=("--recipe", "tv-v2", "--lr-warmup-epochs", "1"),
                 ema=[65.0 + seed])
        make_run(tmp_path, "birds", seed, [40.0, 72.0 + seed], flags=("--recipe", "tv-v2", "--lr-warmup-epochs", "1",
                                                                       "--mixup-alpha", "0.8", "-n", "mix8"),
                 ema=[66.0 + seed])
    text = run_report(tmp_path)
    seed, tv2 = text.split("### --recipe seed")[1].split("### --recipe tv-v2")
    keys, rows = results_table(seed)
    assert keys == ["arch", "amp"] and rows["resnet50/off"]["birds final epoch"] == spread([60.0, 61.0])
    assert "EMA" not in seed.split("## Finished")[0]
    keys, rows = results_table(tv2)
    assert keys == ["arch", "amp", "mixup alpha", "note"]  # not the dozen options tv-v2 sets alike
    assert "Every run below: norm weight decay 0, lr warmup epochs 1, lr warmup method linear, model ema True" in tv2
    assert rows["resnet50/off/0.2/–"]["birds final epoch"] == spread([70.0, 71.0])
    assert rows["resnet50/off/0.8/mix8"]["birds EMA final epoch"] == spread([66.0, 67.0])


def test_the_plot_marks_every_epoch_and_keeps_identical_runs_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    make_run(tmp_path, "cub", 0, [50.0])  # one epoch: a line without markers was invisible
    make_run(tmp_path, "cub", 1, [50.0])  # the same curve
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda plt, fig, path: figures.append(fig))
    assert report.plot(report.find_runs(tmp_path), tmp_path / "p.png")
    lines = figures[0].axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [1, 1] and all(line.get_marker() != "None" for line in lines)
    assert lines[0].get_marker() != lines[1].get_marker()


def test_unfinished_and_failed_runs_are_listed_not_averaged(tmp_path):
    make_run(tmp_path, "cub", 0, [70.0, 80.0])
    make_run(tmp_path, "cub", 1, [60.0, 82.0])
    crashed = make_run(tmp_path, "cub", 2, [10.0, 20.0], epochs=4, finish=False)
    (crashed / "checkpoint.pt").write_bytes(b"")
    # an earlier attempt's summary.json beside a restarted, unfinished run: must not count
    stale = make_run(tmp_path, "cub", 3, [5.0], epochs=2, finish=False)
    write_json(stale / "summary.json", {"final_test_acc": 99.0, "best_test_acc": 99.0, "best_epoch": 2, "epochs": 2})
    (tmp_path / "failed").mkdir()
    write_json(tmp_path / "failed" / "aircraft-s0-off.json",
               {"dataset": "/data/nowhere/aircraft", "seed": 0, "amp": "off", "args": ["--epochs", "2"],
                "exit_code": 2, "log": "logs/sweep_7_3.out"})
    text = run_report(tmp_path)
    _, rows = results_table(text)
    assert rows["resnet50/off"]["cub final epoch"] == spread([80.0, 82.0])
    assert rows["resnet50/off"]["cub best epoch (selected on the test set)"] == spread([80.0, 82.0], n=False)
    assert "aircraft final epoch" not in rows["resnet50/off"]
    unfinished = text.split("## Unfinished and set-aside runs (not in the table)")[1].split("##")[0]
    assert f"`{crashed.relative_to(tmp_path)}`: 2/4 epochs; checkpoint.pt present" in unfinished
    assert f"`{stale.relative_to(tmp_path)}`: 1/2 epochs; no checkpoint" in unfinished
    failed = text.split("## Failed runs (not in the table)")[1]
    assert "/data/nowhere/aircraft, seed 0, amp off: exit code 2; args `--epochs 2`; log `logs/sweep_7_3.out`" in failed


def test_runs_of_other_data_under_one_dataset_name_get_columns_of_their_own(tmp_path):
    """Aircraft at its 100 variants and at its 70 families (two data roots, one name), or the same classes with
    another test split, or renamed classes: never averaged together, and the published number only beside the
    official classes. The same data in another folder (a node-local copy) stays one dataset."""
    make_run(tmp_path / "variant", "aircraft", 0, [90.0])
    make_run(tmp_path / "copy", "aircraft", 1, [92.0])
    make_run(tmp_path / "family", "aircraft", 0, [96.0], num_classes=70)
    make_run(tmp_path / "a", "birds", 0, [50.0])
    make_run(tmp_path / "b", "birds", 0, [70.0], test_total=60)
    _, rows = results_table(run_report(tmp_path))
    assert rows["resnet50/off"]["aircraft (100 classes) final epoch"] == spread([90.0, 92.0])
    assert rows["resnet50/off"]["aircraft (70 classes) final epoch"] == spread([96.0])
    assert "resnet50, published/" not in rows  # beside a column of another name than the published dataset's
    assert rows["resnet50/off"]["birds (100 test images) final epoch"] == spread([50.0])
    assert rows["resnet50/off"]["birds (60 test images) final epoch"] == spread([70.0])
    # renamed classes, the same count and test split
    renamed = make_run(tmp_path / "c", "cub", 0, [80.0])
    make_run(tmp_path / "d", "cub", 1, [60.0])
    cfg = json.loads((renamed / "config.json").read_text())
    write_json(renamed / "config.json", {**cfg, "classes": ["x", *cfg["classes"][1:]]})
    runs = report.find_runs(tmp_path)
    assert sorted(r.dataset for r in runs if r.name == "cub")[0].startswith("cub (classes #")
    assert len({r.dataset for r in runs if r.name == "cub"}) == 2


def test_every_difference_of_the_data_labels_a_column(tmp_path):
    """Among runs of one dataset name whose class counts differ, two of 100 classes on other test splits are still
    apart (the label said the class count alone, and averaged them); so are two of one count and split whose files
    differ (config.json's data_files)."""
    make_run(tmp_path / "a", "aircraft", 0, [90.0])
    make_run(tmp_path / "b", "aircraft", 1, [50.0], test_total=60)
    make_run(tmp_path / "c", "aircraft", 0, [96.0], num_classes=70)
    for folder, files in (("d", "1" * 64), ("e", "2" * 64)):
        run = make_run(tmp_path / folder, "birds", 0, [40.0 if folder == "d" else 60.0])
        write_json(run / "config.json", {**json.loads((run / "config.json").read_text()), "data_files": files})
    _, rows = results_table(run_report(tmp_path))
    cells = rows["resnet50/off"]
    assert cells["aircraft (100 classes, 100 test images) final epoch"] == spread([90.0])
    assert cells["aircraft (100 classes, 60 test images) final epoch"] == spread([50.0])
    assert cells["aircraft (70 classes, 100 test images) final epoch"] == spread([96.0])
    birds = sorted(k for k in cells if k.startswith("birds (data #") and k.endswith("final epoch"))
    assert len(birds) == 2 and sorted(cells[k] for k in birds) == sorted([spread([40.0]), spread([60.0])])


def test_a_published_number_is_shown_only_beside_the_official_classes(tmp_path):
    make_run(tmp_path, "cub", 0, [80.0], num_classes=150)  # a subset of CUB
    _, rows = results_table(run_report(tmp_path))
    assert set(rows) == {"resnet50/off"}


def test_runs_that_differ_in_their_normalisation_are_grouped_by_it(tmp_path):
    """--mean/--std are lists in config.json: a key of the table (a traceback before)."""
    make_run(tmp_path, "cub", 0, [80.0])
    make_run(tmp_path, "cub", 1, [82.0])
    make_run(tmp_path, "cub", 0, [70.0], flags=("--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "-n", "h"))
    keys, rows = results_table(run_report(tmp_path))
    assert keys == ["arch", "amp", "mean", "std", "note"]
    assert rows["resnet50/off/0.485 0.456 0.406/0.229 0.224 0.225/–"]["cub final epoch"] == spread([80.0, 82.0])
    assert rows["resnet50/off/0.5 0.5 0.5/0.5 0.5 0.5/h"]["cub final epoch"] == spread([70.0])


def test_a_run_set_aside_by_a_restart_is_listed_not_averaged(tmp_path):
    """--resume none moved the earlier run (seed 1) to RUN_DIR.old-1; its rerun replaced it."""
    make_run(tmp_path, "cub", 0, [80.0])
    old = make_run(tmp_path, "cub", 1, [40.0])
    old.rename(old.with_name(old.name + ".old-1"))
    make_run(tmp_path, "cub", 1, [86.0])
    text = run_report(tmp_path)
    _, rows = results_table(text)
    assert rows["resnet50/off"]["cub final epoch"] == spread([80.0, 86.0]) and "counted more than once" not in text
    listed = text.split("## Unfinished and set-aside runs (not in the table)")[1]
    assert f"`cub/{old.name}.old-1`: set aside when {old.name} started over (--resume none, or a new --resume " \
        f"PATH)" in listed


def test_restarting_a_run_removes_the_earlier_summary(tmp_path):
    folder = make_run(tmp_path, "cub", 0, [50.0])
    RunLog(folder, is_main=True).start(json.loads((folder / "config.json").read_text()), 0)  # --resume none
    assert not (folder / "summary.json").exists()
    assert run_report(tmp_path).count("0/1 epochs") == 1


def test_only_failures_still_give_a_report(tmp_path, capsys):
    (tmp_path / "failed").mkdir()
    write_json(tmp_path / "failed" / "x.json", {"dataset": "cars", "exit_code": 1})
    text = run_report(tmp_path)
    assert "No finished runs yet." in text and "cars, seed –, amp –: exit code 1" in text


def test_output_file_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    make_run(tmp_path / "runs", "cub", 0, [50.0, 60.0])
    make_run(tmp_path / "runs", "cars", 0, [20.0, 30.0, 40.0], epochs=4, finish=False)
    out, png = tmp_path / "table.md", tmp_path / "acc.png"
    assert report.main([str(tmp_path / "runs"), "-o", str(out), "--plot", str(png)]) == 0
    assert out.read_text() == capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "runs" / "results.md").exists() and not (tmp_path / "runs" / "results.png").exists()


def test_without_matplotlib_the_plot_is_skipped_with_a_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    make_run(tmp_path, "cub", 0, [50.0, 60.0])
    assert report.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "no plot" in err
    assert (tmp_path / "results.md").is_file() and not (tmp_path / "results.png").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "config", "metrics", "summary", "failed", "not-an-object"])
def test_bad_input_is_one_clear_error(tmp_path, case):
    folder = make_run(tmp_path, "cub", 0, [50.0]) if case not in ("missing", "empty") else None
    root, named = tmp_path, str(tmp_path)
    if case == "missing":
        root = tmp_path / "nowhere"
        named = str(root)
    elif case == "config":
        (folder / "config.json").write_text('{"arch": "resnet50",')
        named = str(folder / "config.json")
    elif case == "metrics":
        with open(folder / "metrics.jsonl", "a") as f:
            f.write('{"epoch": 2, "test_a\n')
        named = f"{folder / 'metrics.jsonl'}: line 2"
    elif case == "summary":
        (folder / "summary.json").write_text("")
        named = str(folder / "summary.json")
    elif case in ("failed", "not-an-object"):
        (tmp_path / "failed").mkdir()
        (tmp_path / "failed" / "a.json").write_text("{oops" if case == "failed" else "[1, 2]")
        named = str(tmp_path / "failed" / "a.json")
    with pytest.raises(FgicError, match="no such folder|no runs found|not valid JSON|expected a JSON object") as exc:
        report.main([str(root), "--no-plot"])
    assert named in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.e2e
def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fgic.report", str(tmp_path)], cwd=REPO, env=fgic_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == f"fgic.report: error: RUNS_DIR {tmp_path}: no runs found (no config.json below it, " \
                                 f"no failed/*.json, no eval.json); give fgic.ddp's --output-dir"


def make_eval(folder, confusions=None):
    """An eval.json of 3 classes, 30 test images, 10 per class."""
    folder.mkdir(parents=True, exist_ok=True)
    ev = {"acc": 70.0, "top5": 100.0, "correct": 21, "total": 30, "loss": 0.9, "model": "ckpt.pt",
          "per_class_acc": {"crow": 90.0, "raven": 50.0, "rook": 70.0},
          "per_class_total": {"crow": 10, "raven": 10, "rook": 10}}
    if confusions is not None:
        ev["confusions"] = [{"true": t, "predicted": p, "count": n} for t, p, n in confusions]
    write_json(folder / "eval.json", ev)
    return ev


MISTAKES = [("raven", "crow", 4), ("raven", "rook", 1), ("rook", "raven", 2), ("rook", "crow", 1), ("crow", "rook", 1)]


def test_confused_pairs_add_both_directions_and_rank_by_cost(tmp_path):
    pairs = report.confused_pairs(make_eval(tmp_path, MISTAKES))
    assert [(p["a"], p["b"], p["a_as_b"], p["b_as_a"]) for p in pairs] == \
        [("crow", "raven", 0, 4), ("raven", "rook", 1, 2), ("crow", "rook", 1, 1)]
    assert [round(p["points"], 2) for p in pairs] == [13.33, 10.0, 6.67]
    many = [(f"c{i}", f"c{j}", 1 + i) for i in range(8) for j in range(8) if i != j]
    ranked = report.confused_pairs({"total": 1000, "confusions": [{"true": t, "predicted": p, "count": n}
                                                                   for t, p, n in many]})
    assert len(ranked) == report.TOP_PAIRS == 20 and ranked[0]["a_as_b"] + ranked[0]["b_as_a"] == 7 + 8


def test_each_eval_json_gets_its_pictures_table_and_a_line_in_the_report(tmp_path, capsys):
    optional("matplotlib")
    make_run(tmp_path, "cub", 0, [50.0, 60.0])
    make_eval(tmp_path / "cub" / "evaluated", MISTAKES)
    make_eval(tmp_path / "cub" / "older")  # an eval.json written before the confusions were kept
    assert report.main([str(tmp_path), "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "## Evaluations (eval.json)" in text
    assert ("- `cub/evaluated`: top-1 70.00% (21/30) of `ckpt.pt`; weakest class raven (50.0%); costliest mix-ups: "
            "crow / raven (13.33 points), raven / rook (10.00 points), crow / rook (6.67 points)") in text
    assert "- `cub/older`: top-1 70.00% (21/30) of `ckpt.pt`; weakest class raven (50.0%); no confusion counts" in text
    table = (tmp_path / "cub" / "evaluated" / report.EVAL_TABLE).read_text().splitlines()
    assert "| 1 | crow | raven | 0 | 4 | 13.33 |" in table and len([r for r in table if r.startswith("| ")]) == 2 + 3
    for name in (report.EVAL_PER_CLASS, report.EVAL_CONFUSED):
        assert (tmp_path / "cub" / "evaluated" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "cub" / "older" / report.EVAL_CONFUSED).exists()  # no pairs, no picture of them


def test_without_matplotlib_an_eval_json_still_gets_its_table(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    make_eval(tmp_path / "x", MISTAKES)
    assert report.write_eval_report(tmp_path / "x", json.loads((tmp_path / "x" / "eval.json").read_text())) == \
        [tmp_path / "x" / report.EVAL_TABLE]
