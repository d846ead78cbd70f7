"""The README's commands work as shown: every command in its ```sh blocks is run here with short
settings, or carries a `# needs: GPU|cluster|downloads` marker (on its line or the line above); the
run-directory layout it shows is what the sweep leaves; its links and figures exist.

`make quickstart` and `make test` are not run (they are the whole quickstart and this suite): the
Makefile targets are checked instead. A new command in the README that this file cannot run and
that is not marked fails `test_every_command_is_run_or_marked`.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, launch

README = ROOT / "README.md"
DOCS = ROOT / "docs"
GENERATED = {DOCS / "configuration.md"}  # written from the config schema by `python -m ddt.schema`
MAX_README_BYTES = 8000

# Appended to every `python launch.py` command of the README unless it sets the key itself.
SHORT = ["train.max_steps=4", "train.batch_size=8", "train.ckpt_every=2", "eval.num_samples=20",
         "sampler.num_steps=2", "sampler.batch_size=20", "progress=false"]
# What each `make` target of the README must run (the recipe is checked, not executed).
MAKE_RUNS = {"quickstart": "launch.py", "test": "pytest", "test-fast": "pytest"}
MARKER = re.compile(r"#\s*needs:\s*((?:GPU|cluster|downloads)(?:\s*,\s*(?:GPU|cluster|downloads))*)\s*$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def commands(text: str) -> list[tuple[str, bool]]:
    """(command, marked) for every command line of the ```sh blocks; `\\` continuations joined."""
    found = []
    for lang, body in fenced_blocks(text):
        if lang != "sh":
            continue
        previous = ""
        lines = body.replace("\\\n", " ").splitlines()
        for line in lines:
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                marked = bool(MARKER.search(stripped) or MARKER.search(previous))
                found.append((stripped, marked))
            previous = stripped
    return found


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def kind(command: str) -> str | None:
    w = words(command)
    if w[:1] == ["make"]:
        return "make"
    if w[:2] == ["python", "launch.py"]:
        return "launch"
    if w[:3] == ["python", "-m", "analysis.report"]:
        return "report"
    return None


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expected_points(args: list[str]) -> int:
    """Number of runs a `-m` sweep makes: the product of its comma-separated value counts."""
    n = 1
    for arg in args:
        if "=" in arg and not arg.startswith("hydra/"):
            value = arg.split("=", 1)[1]
            if "," in value and not value.startswith(("[", "{", "'", '"')):
                n *= len(value.split(","))
    return n


def layout_block(text: str) -> list[str]:
    blocks = [body for lang, body in fenced_blocks(text) if lang == "text"]
    assert len(blocks) == 1, "the README shows the run directory layout in one ```text block"
    return blocks[0].splitlines()


def check_layout(lines: list[str], sweep_dir: Path, with_analysis: bool) -> None:
    """The README's tree: the root line is the sweep folder, 2 spaces in a sweep entry, 4 a run entry."""
    run_dirs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert run_dirs
    files = re.compile(r"\b[\w.]+\.(?:png|npz|json|html|pt|yaml|log)\b")
    for line in lines[1:]:
        if not line.strip() or line.strip().startswith("..."):
            continue
        indent = len(line) - len(line.lstrip(" "))
        entry, _, description = line.strip().partition(" ")
        if entry == "...":
            continue
        if indent == 2 and "=" in entry:  # a run directory, named after (among others) this override
            override = entry.rstrip("/")
            assert any(override in d.name.split(",") for d in run_dirs), (override, run_dirs)
            continue
        if indent == 2 and entry.startswith("analysis") and not with_analysis:
            continue
        targets = [sweep_dir / entry] if indent == 2 else [d / entry for d in run_dirs]
        assert indent in (2, 4), line
        for target in targets:
            assert target.exists(), f"README layout: {target} missing"
            if entry.endswith("/"):  # the files its description names
                for name in files.findall(description):
                    assert (target / name).exists(), f"README layout: {target / name} missing"


def test_readme_is_short_and_uses_fenced_blocks():
    text = README.read_text()
    assert len(text.encode()) < MAX_README_BYTES, "keep the README short: move details to docs/"
    assert {lang for lang, _ in fenced_blocks(text)} <= {"sh", "text"}, "```sh for commands, ```text for trees"
    outside = FENCE.sub("", text).splitlines()
    for before, line in zip([""] + outside, outside):
        assert not (re.match(r"^( {4}|\t)\S", line) and not before.strip()), \
            f"indented code block in README (use ```sh so the test sees it): {line!r}"


def test_every_command_is_run_or_marked():
    found = commands(README.read_text())
    assert found, "no commands found in the README's ```sh blocks"
    unhandled = [c for c, marked in found if not marked and kind(c) is None]
    assert not unhandled, ("README commands neither run by tests/test_readme.py nor marked "
                           f"`# needs: GPU|cluster|downloads`: {unhandled}")
    runnable = {kind(c) for c, marked in found if not marked}
    assert {"make", "launch", "report"} <= runnable


def test_make_commands_are_makefile_targets():
    recipes: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"^([\w.-]+)\s*:(?!=)(.*)$", line)
        if rule:
            current = rule.group(1)
            recipes[current] = (rule.group(2), [])
        elif line.startswith("\t") and current:
            recipes[current][1].append(line.strip())
        elif line.strip() and not line.startswith("#"):
            current = None
    makes = [words(c) for c, marked in commands(README.read_text()) if not marked and kind(c) == "make"]
    assert makes
    for w in makes:
        for target in w[1:]:
            assert target in recipes, f"make {target}: no such Makefile target"
            prerequisites, recipe = recipes[target]
            assert target in MAKE_RUNS, f"make {target}: tests/test_readme.py does not know what it runs"
            assert any(MAKE_RUNS[target] in step for step in recipe), (target, recipe)
            assert ".installed" in prerequisites, f"make {target} must create .venv if missing"


def test_launch_and_report_commands_run(tmp_path, cache_dir):
    """Each `python launch.py` command with short settings, then `python -m analysis.report` on its sweep."""
    text = README.read_text()
    found = [c for c, marked in commands(text) if not marked]
    sweeps: dict[str, Path] = {}  # the README's sweep folder (runs/<name>) -> where the test put it
    for i, command in enumerate(c for c in found if kind(c) == "launch"):
        args = words(command)[2:]
        keys = {key_of(a) for a in args}
        args += [s for s in SHORT if key_of(s) not in keys]
        multirun = "-m" in args or "--multirun" in args
        out = tmp_path / f"launch{i}"
        args.append(f"hydra.{'sweep' if multirun else 'run'}.dir={out}")
        launch(*args)
        results = sorted(out.glob("*/results.json" if multirun else "results.json"))
        assert len(results) == (expected_points(args) if multirun else 1), (command, results)
        for path in results:
            data = json.loads(path.read_text())
            assert data["status"] == "completed", (command, path, data.get("error"))
            assert "fid" in data["metrics"]
        if multirun:
            name = next((a.split("=", 1)[1] for a in args if a.startswith("name=")), "quickstart")
            sweeps[f"runs/{name}"] = out
            check_layout(layout_block(text), out, with_analysis=False)

    reports = [c for c in found if kind(c) == "report"]
    for command in reports:
        args = []
        for arg in words(command)[3:]:
            if arg.startswith("runs/"):
                assert arg.rstrip("/") in sweeps, f"{command}: no README sweep made {arg}"
                arg = str(sweeps[arg.rstrip("/")])
            args.append(arg)
        proc = subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for folder in sweeps.values():
        check_layout(layout_block(text), folder, with_analysis=bool(reports))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", [README, *sorted(p for p in DOCS.glob("*.md") if p not in GENERATED)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_figures_exist(page):
    text = FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if file in GENERATED and not file.exists():
            continue
        assert file.exists(), f"{page.name}: broken link {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: no heading #{anchor} in {file.name}"


def test_readme_links_every_docs_page():
    text = README.read_text()
    for page in sorted(set(DOCS.glob("*.md")) | GENERATED):
        assert f"(docs/{page.name}" in text, f"README does not link docs/{page.name}"
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / figure).is_file(), figure
