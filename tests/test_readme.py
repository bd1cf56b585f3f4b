"""The README's layout table names every module and script, and every path it names exists."""
import re

from tests.helpers import REPO


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
