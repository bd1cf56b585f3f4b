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
