"""The README: its layout table names every module and script and every path it names exists; its flag tables match
the parser; every command of its fenced blocks runs in the README's order or is listed here with the reason it is
not."""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, optional


def layout_paths() -> set[str]:
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Layout"):].split("\n\n")[1]
    return {p for row in table.splitlines()[2:] for p in re.findall(r"`([\w./-]+)`", row.split(" | ")[0])}


def test_the_layout_table_matches_the_files():
    named = layout_paths()
    code = {p.relative_to(REPO).as_posix() for folder in ("fgic", "launch", "slurm") for p in (REPO / folder).iterdir()
            if p.is_file() and p.name != "__init__.py" and p.suffix in (".py", ".sh", ".sbatch")}
    assert sorted(code - named) == [], "files the README's layout table leaves out"
    assert sorted(p for p in named if not (REPO / p.rstrip("/")).exists()) == [], "paths in the table that do not exist"


def flag_tables() -> list[str]:
    """The rows of the README's fgic.ddp flag tables (under "## Training")."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Training"):text.index("### Pretrained weights")]
    return [row for row in section.splitlines() if row.startswith("| `-")]


def test_the_flag_tables_match_the_parser():
    """Every flag a table names exists; every fgic.ddp flag is in a table or named in the README; a row's default
    is the one the help gives, where the help gives one."""
    from fgic import config

    parser = config.get_args_parser()
    actions = {s: a for a in parser._actions for s in a.option_strings}
    rows = flag_tables()
    named = {f for row in rows for f in re.findall(r"`(--?[\w-]+)", row.split(" | ")[0])}
    assert sorted(f for f in named if f not in actions) == [], "flags in the README that fgic.ddp does not have"
    text = (REPO / "README.md").read_text()
    missing = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"
               and not any(f"`{s}" in text for s in a.option_strings)}
    assert sorted(missing) == [], "fgic.ddp flags the README never names"
    for row in rows:
        cells = row.split(" | ")
        flags = re.findall(r"`(--?[\w-]+)", cells[0])
        if len(flags) != 1:
            continue
        help_default = re.search(r"\(default:? ([^;),]+)", actions[flags[0]].help or "")
        if help_default and cells[1].strip() and not cells[1].strip().startswith(("`", "CPUs", "global")):
            first = help_default.group(1).split()[0].rstrip(":")
            assert cells[1].split()[0] == first, (flags[0], cells[1], help_default.group(1))


# --- Every README command, in the README's order: run, or listed with the reason it is not -------------------------
# The examples after the set-up form one session on this machine: the demo run, then what the README offers after
# training. They run in a copy of the checkout (`.venv` there is the venv running the tests, `.venv/bin` first on
# PATH, as `source .venv/bin/activate` does), one after another, each where the previous one left its files.
# SHORT is the one shortening, the same for every command that trains or evaluates (fgic.ddp, launch.submitit):
# appended last, it wins over an example's own --epochs, so the examples as written are checked for what it would
# hide, the run-folder check fgic makes on resume (test_readme_examples_agree_as_written).
SHORT = ("--epochs", "1")
TRAINS = re.compile(r"-m (fgic\.ddp|launch\.submitit)\b(?!.*--dry-run)")

SETUP = "the set-up (a fresh venv and pip installs: the new-user walkthrough and .ci/run); the test runs its last part"
SUITE = "the test suite itself (.ci/run runs it)"
REAL_DATA = "needs a real dataset (cub, aircraft, cars, ... under ./data)"
CLUSTER = "needs a Slurm allocation or cluster (tests/test_slurm.py runs the templates on the local one)"
DOWNLOAD = "downloads from the internet"
# A command that runs: `part` is the part of its line run (the default: all of it); `stop` a signal sent once a line
# starting with `after` is printed (the README's "stopped by SIGUSR2"), `code` its exit code (default 0); `expect` a
# line it prints (a regex) beside the README's; `files` what it leaves.
Run = dict


# Every command of the README's fenced blocks, in order (one a README shows twice, twice): a Run, or why the test
# does not run it.
EXAMPLES = [
    ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python -m fgic.ddp -d demo",
     Run(part=".venv/bin/python -m fgic.ddp -d demo", expect=r"^fgic: done\. final top-1 [\d.]+% \(last epoch\)",
            files=["runs/demo/resnet18-off-s2020/summary.json", "runs/demo/resnet18-off-s2020/checkpoint.pt"])),
    (".venv/bin/pip install pytest pytest-xdist ruff && .venv/bin/ruff check . && .venv/bin/python -m pytest -q "
     "-n auto --dist loadfile",
     SUITE),
    ('.venv/bin/python -m pytest -q -m "not e2e" -n auto',
     SUITE),
    ("python -m fgic.ddp -d cub",
     REAL_DATA),
    ("python -m fgic.ddp -d cub -g 0,1,2,3",
     "needs 4 GPUs and a real dataset"),
    ("torchrun --nproc_per_node=4 -m fgic.ddp -d cub -a bf16",
     REAL_DATA + "; bf16 is a GPU's"),
    ("srun --ntasks-per-node=4 --gpus-per-task=1 --cpus-per-task=8 --kill-on-bad-exit=1 python -m fgic.ddp -d cub",
     CLUSTER),
    ("srun --ntasks-per-node=1 python -m launch.torchrun -d cub",
     CLUSTER),
    ("python -m fgic.weights fetch resnet50",
     DOWNLOAD),
    ("python -m fgic.weights fetch timm:vit_base_patch16_224.augreg2_in21k_ft_in1k",
     DOWNLOAD),
    ("python -m fgic.prepare cub ~/downloads/CUB_200_2011.tgz",
     "needs the official download"),
    ("python -m fgic.prepare aircraft ~/downloads/fgvc-aircraft-2013b.tar.gz",
     "needs the official download"),
    ("python -m fgic.prepare cars ~/downloads/stanford_cars",
     "needs the official download"),
    ("python -m fgic.prepare nabirds ~/downloads/nabirds.tar.gz",
     "needs the official download"),
    ("python -m fgic.prepare dogs ~/downloads/stanford_dogs",
     "needs the official download"),
    ("python -m fgic.prepare flowers ~/downloads/flowers102",
     "needs the official download"),
    ("python -m fgic.prepare pets ~/downloads/oxford-iiit-pet",
     "needs the official download"),
    ("WANDB_MODE=offline python -m fgic.ddp -d demo --wandb --epochs 3 -n wandb",  # "stopped by SIGUSR2 ..."
     Run(stop=signal.SIGUSR2, after="fgic: W&B run", code=75)),
    ("WANDB_MODE=offline python -m fgic.ddp -d demo --wandb --epochs 3 -n wandb",  # "then again"
     Run(files=["runs/demo/resnet18-off-s2020-wandb/summary.json"])),
    ("wandb sync runs/demo/resnet18-off-s2020-wandb/wandb/offline-run-*",
     "uploads to W&B's server (a login, the internet)"),
    ("python -m fgic.predict runs/demo/resnet18-off-s2020 data/demo/test/00_red_wingbar_plain -k 3",
     Run(files=["runs/demo/resnet18-off-s2020/predictions/00_red_wingbar_plain.csv"])),
    ("python -m fgic.predict runs/demo/resnet18-off-s2020 data/demo/test -q",
     Run(files=["runs/demo/resnet18-off-s2020/predictions/test.json"])),
    ("python -m fgic.export runs/demo/resnet18-off-s2020",
     Run(files=["runs/demo/resnet18-off-s2020/export/model.pt2"])),
    ("python -m fgic.export runs/demo/resnet18-off-s2020 --format onnx",
     Run(files=["runs/demo/resnet18-off-s2020/export/model.onnx"])),
    ("python -m fgic.ddp -d demo --eval-only --resume runs/demo/resnet18-off-s2020/checkpoint.pt",
     Run(files=["runs/demo/resnet18-off-s2020/eval.json", "runs/demo/resnet18-off-s2020/eval_per_class.png"])),
    ("head -8 runs/demo/resnet18-off-s2020/eval_confused.md | tail -2",
     Run()),
    ("sbatch slurm/train.sbatch -d cub --seed 0",
     CLUSTER),
    ("sbatch --nodes=2 --gpus-per-node=8 slurm/train.sbatch -d cars -a bf16",
     CLUSTER),
    ("sbatch slurm/sweep.sh",
     CLUSTER),
    ('DATASETS="cub cars" SEEDS="0 1 2 3" AMPS="off bf16" FGIC_ARGS="--epochs 64" bash slurm/sweep.sh',
     CLUSTER),
    ('SWEEP="lr=0.05,0.1 arch=resnet50,vit_b_16" MAX_PARALLEL=4 bash slurm/sweep.sh',
     CLUSTER),
    ('DATASETS=demo SEEDS="0 1" SWEEP="lr=0.05,0.1 arch=resnet18,convnext_tiny" MAX_PARALLEL=4 DRY_RUN=1 bash '
    "slurm/sweep.sh",
     Run()),
    ("python -m launch.submitit --datasets cub aircraft cars --seeds 0 1 2 --gpus-per-node 4 --partition gpu --timeout "
    "1440 [--amps off bf16] [--nodes N --account A --constraint C] [fgic.ddp flags, e.g. --epochs 64]",
     "a synopsis (its [optional] parts), for a GPU cluster"),
    ("python -m launch.submitit --datasets cub --seeds 0 1 --dry-run",
     REAL_DATA + " (its flags are checked against it)"),
    ("python -m launch.submitit -d demo --seeds 0 1 --cluster local",
     Run(files=["runs/demo/resnet18-off-s0/summary.json", "runs/demo/resnet18-off-s1/summary.json"])),
    ("python -m launch.submitit -d cub --sweep lr=0.05,0.1 --sweep model-ema=on,off --max-parallel 8",
     CLUSTER),
    ("python -m launch.submitit -d demo --seeds 0 --sweep lr=0.05,0.1 --sweep model-ema=on,off --dry-run --cluster "
    "local",
     Run()),
    ("srun --nodes=2 --ntasks-per-node=1 python -m launch.torchrun -d cub",
     CLUSTER),
    ("python -m fgic.report runs",
     Run(files=["runs/results.md", "runs/results.png"])),
]


def readme_commands() -> list[tuple[str, list[str]]]:
    r"""The README's fenced commands in order, each with the output lines the README shows after it: every line of a
    bash block (comments cut, `\` continuations joined), the `$ ` lines of the other blocks."""
    commands, lang, shown = [], None, None
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            lang, shown = (None if lang is not None else line[3:].strip()), None
        elif lang is None or not line.strip():
            continue
        elif commands and commands[-1][0].endswith("\\"):
            commands[-1] = (commands[-1][0][:-1].rstrip() + " " + line.strip(), shown)
        elif (lang == "bash" and not line.startswith("#")) or line.startswith("$ "):
            shown = [] if line.startswith("$ ") else None
            commands.append((line.removeprefix("$ "), shown))
        elif shown is not None:
            shown.append(line)
    return [(" ".join(re.sub(r"\s+#\s.*$", "", c).split()), out or []) for c, out in commands]


def shape(line: str) -> str:
    """A line with what varies from run to run masked: numbers, the demo's class names, a W&B run's id."""
    line = re.sub(r"W&B run \w+", "W&B run ID", line)
    line = re.sub(r"\b\d\d_[a-z_]+", "CLASS", line)
    return " ".join(re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", line).split())


def test_every_readme_command_is_run_or_has_a_reason():
    """A new README example is either run by test_readme_examples_run_in_order or given a reason in EXAMPLES."""
    assert [c for c, _ in readme_commands()] == [c for c, _ in EXAMPLES], "README commands differ from EXAMPLES"


def test_the_readme_activates_the_venv_before_its_bare_python():
    """The set-up makes `.venv`; the later examples write `python`, `torchrun`, `wandb` (on a fresh Debian `python`
    is no command at all: "python: command not found"): the README says to activate the venv before the first."""
    text = (REPO / "README.md").read_text()
    bare = [c for c, _ in readme_commands() if re.match(r"(\w+=\S+ )*(python|torchrun|wandb) ", c)]
    assert "source .venv/bin/activate" in text[:text.index(bare[0])], f"`{bare[0]}`: which python?"


def ddp_args(command: str):
    """The resolved fgic.ddp flags of a command as written (amp on the CPU, as the README's demo examples run)."""
    from fgic import config

    words = shlex.split(command)
    args = config.resolve(config.get_args_parser().parse_args(words[words.index("fgic.ddp") + 1:]))
    args.amp = "off" if args.amp == "auto" else args.amp
    return args


def test_readme_examples_agree_as_written():
    """SHORT overrides every example's --epochs, which would hide an example that continues an earlier example's run
    folder with other options (the README's W&B example, `--epochs 3` in the first command's folder, was refused:
    `made with other options (--epochs: 8 -> 3)`). As written, the fgic.ddp examples that run and share a run folder
    pass fgic's own resume check, and the other commands that train pass no --epochs of their own."""
    from fgic import checkpoint, config

    first = {}
    for command, decision in EXAMPLES:
        if not isinstance(decision, dict) or not TRAINS.search(command):
            continue
        if "-m fgic.ddp" not in command:
            assert "--epochs" not in shlex.split(command), f"{command}: its --epochs would be hidden by SHORT"
            continue
        args = ddp_args(decision.get("part", command))
        folder = config.run_dir(args, config.dataset_name(args.data))
        if folder in first and args.resume != "none":
            diff = checkpoint.differences(vars(first[folder][1]), vars(args))
            assert not diff, f"`{command}` is refused after `{first[folder][0]}` in {folder}: other options {diff}"
        first.setdefault(folder, (command, args))


def readme_env(work: Path, home: Path) -> dict:
    """A new user's shell in the copy `work`: its venv's bin first on PATH, no fgic or W&B settings (W&B's own folders
    under `home`), the tests' cache folder (conftest.py), one thread per process (2 busy cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FGIC_", "WANDB_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                      "MASTER_", "SLURM_", "TORCHELASTIC"))}
    env.pop("PYTHONPATH", None)
    env.update(PATH=f"{work / '.venv' / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(work / ".venv"),
               OMP_NUM_THREADS="1", FGIC_CACHE=os.environ["FGIC_CACHE"])
    env.update({name: str(home / name.lower()) for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")})
    return env


def run_example(command: str, decision: dict, cwd: Path, env: dict) -> tuple[int, list[str]]:
    """Run one example (its `part`, SHORT appended where it trains), sending `stop` once `after` is printed."""
    line = decision.get("part", command) + (" " + " ".join(SHORT) if TRAINS.search(command) else "")
    proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # bash execs a lone command: the signal reaches the command itself
    lines = []
    for out in proc.stdout:
        lines.append(out.rstrip("\n"))
        if decision.get("stop") and out.startswith(decision["after"]):
            proc.send_signal(decision["stop"])
    return proc.wait(timeout=600), lines


@pytest.mark.e2e
def test_readme_examples_run_in_order(tmp_path):
    """Every README example that runs without a GPU, a cluster, a download or a real dataset, in the README's order,
    in a copy of the checkout, each where the previous ones left their files: it ends as the README says (exit 0 but
    for the one stopped by a signal), prints the lines the README shows after it (in order; numbers, class names and
    W&B ids masked) and leaves its files."""
    for extra in ("wandb", "onnx", "onnxscript", "onnxruntime", "matplotlib"):
        optional(extra)
    work = tmp_path / "fgic"
    for folder in ("fgic", "launch", "slurm"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (work / ".venv").symlink_to(sys.prefix)
    assert (work / ".venv" / "bin" / "python").exists(), f"the tests run in a venv: no {sys.prefix}/bin/python"
    env = readme_env(work, tmp_path / "home")
    wandb_ids, started = set(), time.monotonic()
    for (command, decision), (_, shown) in zip(EXAMPLES, readme_commands(), strict=True):
        if not isinstance(decision, dict):
            continue
        code, lines = run_example(command, decision, work, env)
        print(f"{time.monotonic() - started:6.1f} s  $ {command}")  # the run's pace (pytest -s shows it)
        said = f"$ {command}\n" + "\n".join(lines[-15:])
        assert code == decision.get("code", 0), said
        got = iter(shape(x) for x in lines)
        missing = [x for x in shown if x != "..." and shape(x) not in got]  # in order: `in` consumes the iterator
        assert not missing, f"the README shows lines it did not print: {missing}\n{said}"
        assert not decision.get("expect") or any(re.search(decision["expect"], x) for x in lines), said
        assert [f for f in decision.get("files", []) if not (work / f).is_file()] == [], said
        wandb_ids |= set(re.findall(r"W&B run (\w+) offline", "\n".join(lines)))
    assert len(wandb_ids) == 1, f"the stopped W&B attempt and the resumed one are one W&B run: {wandb_ids}"
