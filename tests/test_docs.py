"""The documentation site: it builds strictly, its reference sections are generated from
the code and cover all of it, and its prose names only things that exist (tasks,
options, settings) and no machine's paths."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shared.control import pipeline
from shared.control.settings import OTHER_VARIABLES, VARIABLES
from shared.records.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "docs_reference", REPO / "scripts/docs_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _reference()


def prose() -> dict[str, str]:
    """Every page as written (before generation), the README and the samples."""
    pages = {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted(DOCS.rglob("*.md"))}
    pages |= {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted(DOCS.rglob("*.txt"))}
    pages["README.md"] = (REPO / "README.md").read_text()
    return pages


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs' strict build: a broken link, an anchor that is not there, a page left out
    of the nav or an unknown generated section fails it."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cli = (tmp_path / "cli" / "index.html").read_text()
    assert "embed-collections run" in cli and "--unit-tokens" in cli
    assert "<!-- reference:" not in (tmp_path / "configuration" / "index.html").read_text()


def test_an_unknown_generated_section_is_an_error() -> None:
    with pytest.raises(KeyError, match="names no generated section"):
        reference.expand("<!-- reference: no-such-table -->")


def test_every_page_asks_only_for_known_sections() -> None:
    for name, text in prose().items():
        for asked in reference.MARKER.findall(text):
            assert asked in reference.GENERATED, f"{name}: {asked}"


def test_the_configuration_table_lists_every_variable() -> None:
    table = reference.configuration_table()
    rows = {line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]}
    assert {v.name for v in VARIABLES} <= rows
    for variable in VARIABLES:
        assert f"| `{variable.name}` | {variable.shown_default} |" in table
    for other in OTHER_VARIABLES:
        assert all(f"`{name}`" in table for name in other.names)


def test_a_documented_default_is_the_one_in_effect() -> None:
    """A default shown from the Settings field (not in words) is that field's value."""
    import dataclasses

    from shared.control.settings import Settings

    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for variable in VARIABLES:
        if variable.default is None:
            value = defaults[variable.field]
            assert variable.shown_default in (str(value), str(value).removesuffix(".0"))


def test_the_exit_code_table_lists_every_code_in_order() -> None:
    table = reference.exit_codes_table()
    codes = [int(line.split("|")[1]) for line in table.splitlines()[2:]]
    assert codes == [code.value for code in ExitCode]
    assert all(reference.exit_code_meanings()[code] for code in ExitCode)


def test_the_cli_reference_has_every_command_and_option() -> None:
    text = reference.cli_reference()
    for name, command in reference.cli_commands().items():
        assert f"### `embed-collections {name}`" in text
        for option in reference.cli_options(command) - {"-h"}:
            assert option in text, f"{name} {option}"


def test_the_pipeline_reference_names_every_task_and_queue() -> None:
    text = reference.pipeline_reference()
    for task, queue in pipeline.routes().items():
        assert f"`{task}`" in text and f"`{queue}`" in text


def test_the_code_map_shows_every_module() -> None:
    text = reference.code_map()
    for package in reference.PACKAGES:
        for module in (REPO / package).rglob("*.py"):
            if module.name not in ("__init__.py", "__main__.py"):
                assert f" {module.name} " in text, module


def registered_tasks() -> set[str]:
    import workers.tasks  # noqa: F401  (registers every task on the app)
    from workers.app import app

    return {name for name in app.tasks if name.startswith("embed_fleet.")}


def test_prose_names_only_registered_tasks() -> None:
    tasks = registered_tasks()
    assert set(pipeline.routes()) <= tasks
    for name, text in prose().items():
        for task in re.findall(r"embed_fleet\.[a-z_]+\.[a-z_]+", text):
            assert task in tasks, f"{name} names {task}, which is no registered task"


def test_prose_names_only_real_settings() -> None:
    known = {v.name for v in VARIABLES}
    for name, text in prose().items():
        for variable in re.findall(r"EMBED_FLEET_[A-Z_]*[A-Z]", text):
            assert variable in known, f"{name} names {variable}, which is no setting"


def _other_options() -> set[str]:
    """Options of the other programs the docs show: celery's worker, docker compose's
    ``--scale``, and the benchmark scripts (their argparse options)."""
    from celery.bin.worker import worker

    found = {opt for param in worker.params for opt in param.opts}
    found |= {"--scale"}  # docker compose's (no container engine here to ask)
    for script in (REPO / "bench").glob("*.py"):
        found |= set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))
    return found


def test_prose_names_only_real_options() -> None:
    """An option after ``embed-collections CMD`` on the same line is one of CMD's; an
    option on its own in backticks is one of some command's, celery's or a bench's."""
    commands = reference.cli_commands()
    per_command = {name: reference.cli_options(c) for name, c in commands.items()}
    anywhere = set().union(*per_command.values()) | _other_options()
    for name, text in prose().items():
        for line in text.splitlines():
            for used in re.finditer(r"embed-collections ([a-z]+)((?:[^`|#]|`(?!`))*)", line):
                command, rest = used.group(1), used.group(2).split("`")[0]
                if command not in commands:
                    continue
                for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                    assert option in per_command[command], f"{name}: {command} {option}"
            for option in re.findall(r"`(--[a-z][a-z0-9-]*)", line):
                assert option in anywhere, f"{name}: {option} is no option of anything shown"


def test_no_page_shows_a_machine_path() -> None:
    """Samples come from scripts/docs-samples with paths made relative: nothing of the
    machine they ran on (a home, a checkout, a temporary folder) shows."""
    machine = re.compile(r"(?:^|[\s`'\"(=:])/(work|tmp|root|home|Users|var/folders)/", re.M)
    for name, text in prose().items():
        found = machine.search(text)
        assert found is None, f"{name}: {text[max(0, found.start() - 40) : found.end() + 40]!r}"


def test_the_readme_is_a_short_front_page_that_links_every_page() -> None:
    import yaml

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages = [page for entry in nav for page in entry.values() if page != "index.md"]
    for page in pages:
        assert f"](docs/{page}" in readme, f"the README does not link {page}"
