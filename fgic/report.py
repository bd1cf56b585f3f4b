"""The results table of a folder of runs, mean ± std over seeds per dataset and config: `python -m fgic.report RUNS`.

A run is a folder holding config.json (fgic.ddp writes RUNS_DIR/DATASET/RUN_NAME/); it is finished when its
summary.json exists and metrics.jsonl has a record for every epoch of the config. Finished runs are grouped by
dataset and configuration: the options that change what a run computes (fgic.config.MEANING, and the note),
less the dataset and the seed. Every other run is listed as unfinished, never averaged in.

Failures that leave no run folder (a sweep task whose data path was wrong, say) are read from small JSON files
RUNS_DIR/failed/*.json, one per failed combination, written by whoever launched it (e.g. the Slurm sweep script):

    {"dataset": "cub", "seed": 1, "amp": "off", "args": ["--epochs", "128"], "exit_code": 2,
     "log": "logs/sweep_1234_5.out"}

dataset as given to -d (a name or a path), args the extra fgic.ddp flags (a list or one string), log the path of
the job's log. Any key may be missing or null. A launcher that retries a combination successfully removes its
file (a name per combination, e.g. failed/DATASET-RUN_NAME.json as slurm/sweep.sh writes, makes that easy).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fgic.cli import run_cli
from fgic.config import MEANING, completed
from fgic.errors import FgicError
from fgic.jsonfile import read_object
from fgic.runlog import CHECKPOINT, read_records

# The configuration of a run: what changes its result, less the dataset and the seed (the table's columns and the
# spread). arch and amp are always shown; the others only when they differ among the runs.
ALWAYS_SHOWN = ("arch", "amp")
CONFIG_KEYS = ALWAYS_SHOWN + tuple(k for k in MEANING if k not in ("dataset", "num_classes", "seed", *ALWAYS_SHOWN)) \
    + ("note",)
# Published top-1 of the single-GPU ResNet-50 recipe, best epoch selected on the test set.
PUBLISHED = {"cub": 86.74, "aircraft": 93.25, "cars": 94.09}
PUBLISHED_CLASSES = {"cub": 200, "aircraft": 100, "cars": 196}  # Aircraft's variants, not its 70 families
PUBLISHED_ARCH = "resnet50"
BEST_LABEL = "best epoch (selected on the test set)"
EMA_LABEL = "EMA final epoch"
FAILURE_KEYS = ("dataset", "seed", "amp", "args", "exit_code", "log")
# Written beside an eval.json (fgic.ddp --eval-only, fgic.report): the pictures need matplotlib
EVAL_TABLE, EVAL_PER_CLASS, EVAL_CONFUSED = "eval_confused.md", "eval_per_class.png", "eval_confused.png"
TOP_PAIRS = 20
MARKERS = "osD^v<>p"


@dataclass
class Run:
    path: Path
    config: dict
    records: list = field(default_factory=list)
    summary: dict | None = None
    why: str = ""  # empty when finished
    label: str = ""  # the dataset's name with what tells it from another dataset of that name (see label_datasets)

    @property
    def finished(self) -> bool:
        return not self.why

    @property
    def name(self) -> str:
        return str(self.config.get("dataset") or self.path.parent.name)

    @property
    def dataset(self) -> str:
        return self.label or self.name

    def key(self, keys) -> tuple:
        return tuple(tuple(v) if isinstance(v, list) else v for v in (self.config.get(k) for k in keys))  # --mean


def load_run(folder: Path) -> Run:
    """A run folder's files, and why it is not in the table (empty when it is finished)."""
    metrics, summary = folder / "metrics.jsonl", folder / "summary.json"
    run = Run(folder, completed(read_object(folder / "config.json")))
    run.records = read_records(metrics)
    if summary.is_file():
        run.summary = read_object(summary)
    epochs = run.config.get("epochs")
    done = [r.get("epoch") for r in run.records]
    aside = re.fullmatch(r"(.+)\.old-\d+", folder.name)
    if aside:  # averaged with the run that replaced it, it would count its seed twice
        run.why = f"set aside when {aside[1]} started over (--resume none, or a new --resume PATH)"
    elif not isinstance(epochs, int):
        run.why = "config.json has no epochs"
    elif done != list(range(1, len(done) + 1)):
        run.why = f"metrics.jsonl has epochs {done}, expected 1, 2, ..."
    elif len(done) < epochs or run.summary is None:
        last = datetime.fromtimestamp(metrics.stat().st_mtime, timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC") if done else None
        state = ("all epochs recorded but no summary.json" if len(done) >= epochs else
                 "checkpoint.pt present: stopped, crashed or still running; the same command resumes it"
                 if (folder / CHECKPOINT).is_file() else "no checkpoint")
        run.why = f"{len(done)}/{epochs} epochs; {state}" + (f"; last record {last}" if last else "")
    elif not all(isinstance(run.summary.get(k), (int, float)) for k in ("final_test_acc", "best_test_acc")):
        run.why = "summary.json lacks final_test_acc or best_test_acc"
    return run


def find_runs(root: Path) -> list[Run]:
    runs = [load_run(p.parent) for p in sorted(root.rglob("config.json"))]
    label_datasets(runs)
    return runs


def label_datasets(runs: list[Run]) -> None:
    """Runs on datasets of one name that are not the same data (Aircraft's 100 variants and its 70 families, two
    birds folders, another test split) are labelled with all that tells them apart: the class count, the test images,
    the class names, the files (config.json's data_files: paths relative to -d, sizes, labels); so that no column
    averages them together. A copy of the same data elsewhere keeps the name."""
    names: dict[str, list[Run]] = {}
    for run in runs:
        names.setdefault(run.name, []).append(run)
    for name, group in names.items():
        attributes = (([r.config.get("num_classes") for r in group], "{} classes"),
                      ([r.records[-1].get("test_total") if r.records else None for r in group], "{} test images"),
                      ([short(r.config.get("classes")) for r in group], "classes #{}"),
                      ([short(r.config.get("data_files")) for r in group], "data #{}"))
        told: list[tuple[list, str]] = []
        for values, shown in attributes:  # each that still differs among runs the ones before leave together
            cells: dict[tuple, set] = {}
            for i in range(len(group)):
                cells.setdefault(tuple(v[i] for v, _ in told), set()).add(values[i])
            if any(len(cell - {None}) > 1 for cell in cells.values()):
                told.append((values, shown))
        for i, run in enumerate(group):
            if told:
                parts = (shown.format(v[i]) if v[i] is not None else "unknown" for v, shown in told)
                run.label = f"{name} ({', '.join(parts)})"


def short(value) -> str | None:
    """A value's 6-character digest (None stays None: an older config without it)."""
    return None if value is None else hashlib.sha1(json.dumps(value).encode()).hexdigest()[:6]


def find_failures(root: Path) -> list[dict]:
    """The records of RUNS_DIR/failed/*.json (see the module docstring), each with its file as "file"."""
    folder = root / "failed"
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        rec = read_object(path)
        out.append({**{k: rec.get(k) for k in FAILURE_KEYS}, "file": path})
    return out


def shown_keys(runs: list[Run]) -> list[str]:
    """arch, amp and every other configuration option that differs among the runs."""
    return [k for k in CONFIG_KEYS if k in ALWAYS_SHOWN or len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def by_recipe(finished: list[Run]) -> list[tuple[str, list[Run]]]:
    """The runs in one group per --recipe (a preset fills a dozen flags: one table for all would show each of them
    as a column), in the presets' order; one group when all share one."""
    groups: dict[str, list[Run]] = {}
    for run in finished:
        groups.setdefault(str(run.config.get("recipe") or "seed"), []).append(run)
    return sorted(groups.items(), key=lambda kv: (kv[0] != "seed", kv[0]))


def spread(values: list[float], with_n: bool = True) -> str:
    """'mean ± sample std (n)', or 'value (1)' for one run."""
    n = f" ({len(values)})" if with_n else ""
    if len(values) == 1:
        return f"{values[0]:.2f}{n}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{n}"


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def fmt(value) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, (list, tuple)):  # --mean, --std
        return " ".join(map(fmt, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def order(values) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in values)


def dataset_rank(name: str) -> tuple:
    """The recipe's datasets first, in the recipe's order, then the others by name."""
    return (list(PUBLISHED).index(name) if name in PUBLISHED else len(PUBLISHED), name)


def dataset_order(names) -> list[str]:
    return sorted(set(names), key=dataset_rank)


def table(finished: list[Run]) -> list[str]:
    """Rows: configurations; per dataset two columns, the last epoch and the best epoch, and the EMA's last epoch
    where runs kept one (--model-ema)."""
    keys = shown_keys(finished)
    datasets = dataset_order(r.dataset for r in finished)
    groups: dict[tuple, dict[str, list[Run]]] = {}
    for run in finished:
        groups.setdefault(run.key(keys), {}).setdefault(run.dataset, []).append(run)
    ema = {d for d in datasets if any(r.dataset == d and "ema_final_test_acc" in r.summary for r in finished)}
    head = [k.replace("_", " ") for k in keys]
    head += [c for d in datasets for c in (f"{d} final epoch", f"{d} {BEST_LABEL}", *([f"{d} {EMA_LABEL}"]
                                                                                       if d in ema else []))]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(keys) + " ---: |" * (len(head) - len(keys))]
    for config in sorted(groups, key=order):
        cells = [fmt(v) for v in config]
        for d in datasets:
            runs = groups[config].get(d, [])
            cells += [spread([r.summary["final_test_acc"] for r in runs]) if runs else "",
                      spread([r.summary["best_test_acc"] for r in runs], with_n=False) if runs else ""]
            if d in ema:
                emas = [r.summary["ema_final_test_acc"] for r in runs if "ema_final_test_acc" in r.summary]
                cells.append(spread(emas) if emas else "")
        lines.append("| " + " | ".join(cells) + " |")
    published = {d for d in datasets if d in PUBLISHED and all(r.config.get("num_classes") == PUBLISHED_CLASSES[d]
                                                                for r in finished if r.dataset == d)}
    if any(r.config.get("arch") == PUBLISHED_ARCH and r.dataset in published for r in finished):
        cells = [f"{PUBLISHED_ARCH}, published" if k == "arch" else "" for k in keys]
        for d in datasets:
            cells += ["", f"{PUBLISHED[d]:.2f}" if d in published else ""] + ([""] if d in ema else [])
        lines.append("| " + " | ".join(cells) + " |")
    for (config, d), seeds in sorted(repeated_seeds(groups).items(), key=lambda kv: (order(kv[0][0]), kv[0][1])):
        lines.append(f"\nNote: {d}, {', '.join(f'{k} {fmt(v)}' for k, v in zip(keys, config))}: seed "
                     f"{', '.join(map(fmt, seeds))} counted more than once (the same run in several folders?)")
    return lines


def tables(finished: list[Run]) -> list[str]:
    """One table, or one per recipe when they differ: each shows the options that vary within it, and names above
    it those that are the same in all its runs but differ from another table's."""
    groups = by_recipe(finished)
    if len(groups) == 1:
        return table(finished)
    everywhere = set(shown_keys(finished))
    out = []
    for recipe, runs in groups:
        mine = set(shown_keys(runs))
        same = [f"{k.replace('_', ' ')} {fmt(runs[0].config.get(k))}" for k in CONFIG_KEYS
                if k in everywhere - mine and k != "recipe"]
        out += [f"### --recipe {recipe}", ""] + ([f"Every run below: {', '.join(same)}.", ""] if same else [])
        out += table(runs) + [""]
    return out[:-1]


def repeated_seeds(groups: dict) -> dict:
    out = {}
    for config, by_dataset in groups.items():
        for d, runs in by_dataset.items():
            seeds = [r.config.get("seed") for r in runs]
            again = sorted({json.dumps(s) for s in seeds if seeds.count(s) > 1})
            if again:
                out[(config, d)] = [json.loads(s) for s in again]
    return out


def render(root: Path, runs: list[Run], failures: list[dict], evaluated: list[str] = ()) -> str:
    finished = [r for r in runs if r.finished]
    out = [f"# Results: {root}", ""]
    if finished:
        out += ["Top-1 test accuracy (%) of the finished runs: mean ± sample standard deviation over seeds (number of "
                "runs). *final epoch*: the last epoch, the honest number. "
                f"*{BEST_LABEL}*: the best of all epochs, chosen by looking at the test set, so optimistic; the "
                "published numbers were reported this way.", ""]
        out += tables(finished)
        out += ["", "## Finished runs", "", "| dataset | run | seed | final epoch | best epoch (epoch) | wall time |",
                "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in sorted(finished, key=lambda r: (dataset_rank(r.dataset), str(r.path))):
            s = r.summary
            out.append(f"| {r.dataset} | {r.path.relative_to(root)} | {fmt(r.config.get('seed'))} | "
                       f"{s['final_test_acc']:.2f} | {s['best_test_acc']:.2f} ({fmt(s.get('best_epoch'))}) | "
                       f"{duration(s.get('wall_seconds'))} |")
    else:
        out.append("No finished runs yet.")
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        out += ["", "## Unfinished and set-aside runs (not in the table)", ""]
        out += [f"- `{r.path.relative_to(root)}`: {r.why}" for r in unfinished]
    if failures:
        out += ["", "## Failed runs (not in the table)", ""]
        for f in failures:
            args = " ".join(map(str, f["args"])) if isinstance(f["args"], list) else f["args"]
            out.append(f"- {fmt(f['dataset'])}, seed {fmt(f['seed'])}, amp {fmt(f['amp'])}: exit code "
                       f"{fmt(f['exit_code'])}; args `{fmt(args)}`; log `{fmt(f['log'])}` "
                       f"({f['file'].relative_to(root)})")
    return "\n".join([*out, *evaluated]) + "\n"


def pyplot():
    """matplotlib.pyplot drawing to files, or None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: PLC0415  (matplotlib: an optional extra, for the pictures only)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100, bbox_inches="tight")  # long class names and outside legends kept whole
    except OSError as exc:
        raise FgicError(f"{path}: cannot write ({exc.strerror})") from None
    finally:
        plt.close(fig)


def plot(runs: list[Run], path: Path) -> bool:
    """Test accuracy per epoch, one panel per dataset and one line per run (dashed: unfinished). False without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415  (matplotlib: an optional extra)
    runs = [r for r in runs if r.records]
    datasets = dataset_order(r.dataset for r in runs)
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(5 * max(len(datasets), 1), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for i, r in enumerate(sorted((r for r in runs if r.dataset == d), key=lambda r: r.path.name)):
            # a marker at every epoch (a one-epoch run is a point), and markers that differ with the run, drawn
            # smaller each time, so that identical curves stay visible over each other
            ax.plot([x["epoch"] for x in r.records], [x["test_acc"] for x in r.records],
                    "-" if r.finished else "--", marker=MARKERS[i % len(MARKERS)], markersize=max(9 - i % 4 * 2, 3),
                    fillstyle="none" if i % 2 else "full", alpha=0.85,
                    label=r.path.name + ("" if r.finished else " (unfinished)"))
        ax.set(title=d, xlabel="epoch", ylabel="test top-1 (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    save_figure(plt, fig, path)
    return True


def confused_pairs(ev: dict, n: int = TOP_PAIRS) -> list[dict]:
    """The n class pairs whose mix-ups cost most top-1, from eval.json's confusions: a, b, how often each was taken
    for the other, and the top-1 points (percent of the test images) the pair's errors cost."""
    pairs: dict[tuple, dict] = {}
    for c in ev.get("confusions") or []:
        a, b = sorted((c["true"], c["predicted"]))
        pair = pairs.setdefault((a, b), {"a": a, "b": b, "a_as_b": 0, "b_as_a": 0})
        pair["a_as_b" if c["true"] == a else "b_as_a"] += c["count"]
    ranked = sorted(pairs.values(), key=lambda p: (-(p["a_as_b"] + p["b_as_a"]), p["a"], p["b"]))[:n]
    return [{**p, "points": 100.0 * (p["a_as_b"] + p["b_as_a"]) / max(ev.get("total") or 1, 1)} for p in ranked]


def confused_table(ev: dict) -> list[str]:
    pairs = confused_pairs(ev)
    lines = [f"# The {len(pairs)} most confused class pairs", "",
             f"Top-1 {ev['acc']:.2f}% ({ev['correct']}/{ev['total']}) of `{ev.get('model')}`. *points*: the top-1 "
             f"percentage points the pair's mistakes cost.", "",
             "| # | class a | class b | a taken for b | b taken for a | points |",
             "| ---: | --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {i} | {p['a']} | {p['b']} | {p['a_as_b']} | {p['b_as_a']} | {p['points']:.2f} |"
              for i, p in enumerate(pairs, 1)]
    return lines


def eval_pictures(plt, folder: Path, ev: dict) -> list[Path]:
    """EVAL_PER_CLASS: per-class accuracy as sorted bars (worst at the top); EVAL_CONFUSED: the costliest pairs."""
    per_class = sorted(((acc, c) for c, acc in ev["per_class_acc"].items() if acc is not None), reverse=True)
    fig, ax = plt.subplots(figsize=(8, 1 + 0.16 * len(per_class)))
    ax.barh(range(len(per_class)), [a for a, _ in per_class], color="tab:blue")
    ax.set_yticks(range(len(per_class)), [c for _, c in per_class], fontsize=7 if len(per_class) > 40 else 9)
    ax.axvline(ev["acc"], color="tab:red", linestyle="--", label=f"top-1 {ev['acc']:.2f}%")
    ax.set(xlim=(0, 100), xlabel="test accuracy (%)", title=f"Per-class accuracy ({len(per_class)} classes)")
    ax.margins(y=0.005)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: over the bars it hid a class's bar end
    out = [folder / EVAL_PER_CLASS]
    save_figure(plt, fig, out[0])
    pairs = confused_pairs(ev)
    if pairs:
        fig, ax = plt.subplots(figsize=(8, 1 + 0.45 * len(pairs)))
        labels = [f"{p['a']} /\n{p['b']}" for p in reversed(pairs)]  # on one line, long names squeezed the bars
        ax.barh(labels, [p["a_as_b"] for p in reversed(pairs)], label="a taken for b")
        ax.barh(labels, [p["b_as_a"] for p in reversed(pairs)], left=[p["a_as_b"] for p in reversed(pairs)],
                label="b taken for a")
        ax.set(xlabel="test images", title=f"The {len(pairs)} most confused class pairs (a / b)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
        out.append(folder / EVAL_CONFUSED)
        save_figure(plt, fig, out[-1])
    return out


def write_eval_report(folder: Path, ev: dict) -> list[Path]:
    """Beside eval.json: the most confused pairs as a table (EVAL_TABLE) and, with matplotlib, the pictures."""
    table_path = folder / EVAL_TABLE
    try:
        table_path.write_text("\n".join(confused_table(ev)) + "\n")
    except OSError as exc:
        raise FgicError(f"{table_path}: cannot write ({exc.strerror})") from None
    plt = pyplot()
    return [table_path, *(eval_pictures(plt, folder, ev) if plt is not None else [])]


def evaluations(root: Path) -> list[str]:
    """The results.md section of the eval.json files below RUNS_DIR, their tables and pictures (re)written."""
    lines = []
    for path in sorted(root.rglob("eval.json")):
        ev = read_object(path)
        if not isinstance(ev.get("per_class_acc"), dict) or not all(k in ev for k in ("acc", "correct", "total")):
            lines.append(f"- `{path.relative_to(root)}`: lacks acc, correct, total or per_class_acc; rerun --eval-only")
            continue
        written = write_eval_report(path.parent, ev)
        scored = [(acc, c) for c, acc in ev["per_class_acc"].items() if acc is not None]
        worst = min(scored) if scored else None
        pairs = confused_pairs(ev, 3)
        costly = ("; costliest mix-ups: " + ", ".join(f"{p['a']} / {p['b']} ({p['points']:.2f} points)" for p in pairs)
                  if pairs else "; no confusion counts (an eval.json of an older fgic: rerun --eval-only)"
                  if "confusions" not in ev else "")
        lines.append(f"- `{path.parent.relative_to(root)}`: top-1 {ev['acc']:.2f}% ({ev['correct']}/{ev['total']}) "
                     f"of `{ev.get('model')}`" + (f"; weakest class {worst[1]} ({worst[0]:.1f}%)" if worst else "")
                     + costly + "; " + ", ".join(f"`{p.relative_to(root)}`" for p in written))
    return ["", "## Evaluations (eval.json)", "", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("fgic.report", description="Print and save the results table of the runs under "
                                "RUNS_DIR (mean ± std over seeds), and plot test accuracy per epoch.")
    p.add_argument("runs_dir", metavar="RUNS_DIR", type=Path, help="a folder of fgic.ddp runs (its --output-dir)")
    p.add_argument("-o", "--output", type=Path, help="the markdown table (default RUNS_DIR/results.md)")
    p.add_argument("--plot", type=Path, help="the PNG plot (default RUNS_DIR/results.png; needs matplotlib)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    args = p.parse_args(argv)
    root = args.runs_dir
    if not root.is_dir():
        raise FgicError(f"RUNS_DIR {root}: no such folder; give fgic.ddp's --output-dir (default ./runs)")
    runs, failures, evaluated = find_runs(root), find_failures(root), evaluations(root)
    if not runs and not failures and not evaluated:
        raise FgicError(f"RUNS_DIR {root}: no runs found (no config.json below it, no failed/*.json, no eval.json); "
                        f"give fgic.ddp's --output-dir")
    text = render(root, runs, failures, evaluated)
    output = args.output or root / "results.md"
    try:
        output.write_text(text)
    except OSError as exc:
        raise FgicError(f"-o {output}: cannot write ({exc.strerror})") from None
    print(text, end="")
    print(f"fgic.report: table written to {output}", file=sys.stderr)
    if not args.no_plot:
        png = args.plot or root / "results.png"
        if plot(runs, png):
            print(f"fgic.report: plot written to {png}", file=sys.stderr)
        else:
            print("fgic.report: notice: matplotlib is not installed (pip install matplotlib, or the 'report' extra); "
                  "no plot", file=sys.stderr)
    return 0


def cli() -> None:
    run_cli(main, "fgic.report")


if __name__ == "__main__":
    cli()
