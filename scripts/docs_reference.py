"""The documentation's reference sections, generated from the code when the site builds.

A page asks for one with a marker line, ``<!-- reference: NAME -->``; this mkdocs hook
(``hooks:`` in ``mkdocs.yml``) replaces the marker with what the code says, so the CLI
reference, the configuration and exit-code tables, the pipeline's phases, stages, queues
and task names, and the code map cannot drift from the code. An unknown name fails the
build. ``tests/test_docs.py`` imports this module too: the prose is checked against the
same facts.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import click  # noqa: E402

from shared.control import pipeline  # noqa: E402
from shared.control.settings import OTHER_VARIABLES, VARIABLES  # noqa: E402
from shared.records.errors import ExitCode  # noqa: E402

MARKER = re.compile(r"^<!-- reference: ([a-z-]+) -->$", re.M)
CLI_NAME = "embed-collections"
# The order a reader meets the commands in: a job, then the fleet, then the output.
COMMAND_ORDER = ("run", "status", "resume", "cancel", "queues", "leases", "export")
# The packages of the code map, and the folders of each that are not code.
PACKAGES = ("producer", "workers", "shared")


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def cli_commands() -> dict[str, click.Command]:
    """Every command of ``embed-collections``, in reading order."""
    from producer.cli import main

    ctx = click.Context(main, info_name=CLI_NAME)
    names = main.list_commands(ctx)
    ordered = [n for n in COMMAND_ORDER if n in names] + [
        n for n in names if n not in COMMAND_ORDER
    ]
    return {name: command for name in ordered if (command := main.get_command(ctx, name))}


def cli_options(command: click.Command) -> set[str]:
    """Every option string of a command (``--output``, ``-o``, ``--help``)."""
    ctx = click.Context(command, info_name=command.name)
    found: set[str] = set()
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            found.update(param.opts)
            found.update(param.secondary_opts)
    return found


def cli_reference() -> str:
    """Each command: its synopsis, what its docstring says, and a table of its options
    (with their defaults, as ``--help`` shows them)."""
    from producer.cli import main

    root = click.Context(main, info_name=CLI_NAME)
    out = [inspect.cleandoc(main.help or ""), ""]
    for name, command in cli_commands().items():
        ctx = click.Context(command, info_name=name, parent=root)
        pieces = " ".join(command.collect_usage_pieces(ctx))
        out += [f"### `{CLI_NAME} {name}`", "", "```", f"{CLI_NAME} {name} {pieces}", "```", ""]
        out += [inspect.cleandoc(command.help or ""), ""]
        rows = []
        for param in command.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                rows.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |")
        if rows:
            out += ["| option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)


def configuration_table() -> str:
    """Every variable the fleet reads, with its default and meaning."""
    rows = [f"| `{v.name}` | {_cell(v.shown_default)} | {_cell(v.meaning)} |" for v in VARIABLES]
    rows += [
        f"| {', '.join(f'`{n}`' for n in v.names)} | {_cell(v.default)} | {_cell(v.meaning)} |"
        for v in OTHER_VARIABLES
    ]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


def exit_code_meanings() -> dict[ExitCode, str]:
    """Each exit code's docstring (the string under its member in ``ExitCode``)."""
    tree = ast.parse(inspect.getsource(ExitCode))
    body = tree.body[0].body  # type: ignore[attr-defined]
    meanings: dict[ExitCode, str] = {}
    for statement, following in itertools.pairwise(body):
        if isinstance(statement, ast.Assign) and isinstance(following, ast.Expr):
            name = statement.targets[0].id  # type: ignore[attr-defined]
            meanings[ExitCode[name]] = inspect.cleandoc(following.value.value)  # type: ignore[attr-defined]
    return meanings


def exit_codes_table() -> str:
    meanings = exit_code_meanings()
    rows = [f"| {code.value} | `{code.name}` | {_cell(meanings[code])} |" for code in ExitCode]
    return "\n".join(["| exit code | name | meaning |", "|---|---|---|", *rows])


def _phrase(applies: Callable[[Any], bool]) -> str:
    """When a phase or stage applies, from its predicate's docstring."""
    return _cell(inspect.getdoc(applies) or "Every job.")


def pipeline_reference() -> str:
    """The pipeline table: phases in order, the stages doing their units (task and
    queue), and the aggregator steps between them."""
    out = ["## Phases", "", "| phase | opened by | job status | applies |", "|---|---|---|---|"]
    for phase in pipeline.PHASES:
        opener = f"`{phase.opened_by}`" if phase.opened_by else "the producer"
        out.append(f"| `{phase.name}` | {opener} | `{phase.status}` | {_phrase(phase.applies)} |")
    out += ["", "## Stages", ""]
    out += ["| stage | phase | task | queue | counts | a unit that keeps failing |"]
    out += ["|---|---|---|---|---|---|"]
    for stage in pipeline.STAGES:
        ends = "fails the job" if stage.failure_ends_job else "leaves the job `partial`"
        for variant, route in stage.routes.items():
            name = f"`{stage.name}`" + (f" ({variant})" if variant else "")
            out.append(
                f"| {name} | `{stage.phase}` | `{route.task}` | `{route.queue}` | "
                f"{stage.counts} | {ends} |"
            )
    out += [
        "",
        "## Aggregator steps",
        "",
        "| step | task | queue | job status |",
        "|---|---|---|---|",
    ]
    for step in pipeline.STEPS:
        out.append(
            f"| `{step.name}` | `{step.route.task}` | `{step.route.queue}` | `{step.status}` |"
        )
    out += ["", "## Queues", "", "| queue | tasks |", "|---|---|"]
    by_queue: dict[str, list[str]] = {}
    for task, queue in pipeline.routes().items():
        by_queue.setdefault(queue, []).append(task)
    for queue in pipeline.QUEUES:
        out.append(f"| `{queue}` | {', '.join(f'`{t}`' for t in by_queue.get(queue, []))} |")
    return "\n".join(out)


def _summary(path: Path) -> str:
    """The first sentence of a module's docstring (a package's: its ``__init__``)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n", 1)[0].split())
    match = re.match(r"(.+?[.:])(\s|$)", first)
    return (match.group(1) if match else first).rstrip(":.")


def code_map() -> str:
    """The packages, sub-packages and modules, each with the first sentence of its
    docstring."""
    lines: list[str] = []

    def walk(folder: Path, depth: int) -> None:
        indent = "  " * depth
        lines.append(
            f"{indent}{folder.name + '/':<{30 - len(indent)}} {_summary(folder / '__init__.py')}"
        )
        for child in sorted(folder.iterdir()):
            if child.is_dir() and (child / "__init__.py").exists():
                walk(child, depth + 1)
            elif child.suffix == ".py" and child.name not in ("__init__.py", "__main__.py"):
                inner = "  " * (depth + 1)
                lines.append(f"{inner}{child.name:<{30 - len(inner)}} {_summary(child)}")

    for package in PACKAGES:
        walk(REPO / package, 0)
    return "```\n" + "\n".join(lines) + "\n```"


def _literal_block(path: str) -> str:
    """The first literal block (after a line ending in ``::``) of a module's docstring,
    as a code block: where the module already draws what it keeps."""
    doc = ast.get_docstring(ast.parse((REPO / path).read_text())) or ""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    block: list[str] = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return "```\n" + textwrap.dedent("\n".join(block)).strip("\n") + "\n```"


def store_layout() -> str:
    """A job's objects in the store (``JobLayout``'s module docstring)."""
    return _literal_block("shared/records/job_store.py")


def ledger_keys() -> str:
    """The job ledger's Redis keys (the ledger module's docstring)."""
    return _literal_block("shared/control/ledger.py")


def readme() -> str:
    """The README as the site's front page: its links into ``docs/`` become the site's
    own (a link anywhere else fails the strict build: the README links only the site)."""
    return (REPO / "README.md").read_text().replace("](docs/", "](")


GENERATED: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "configuration": configuration_table,
    "exit-codes": exit_codes_table,
    "pipeline": pipeline_reference,
    "code-map": code_map,
    "store-layout": store_layout,
    "ledger-keys": ledger_keys,
    "readme": readme,
}


def expand(markdown: str) -> str:
    """A page with each marker replaced by what it names."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATED:
            raise KeyError(
                f"<!-- reference: {name} --> names no generated section; "
                f"known: {', '.join(GENERATED)} (scripts/docs_reference.py)"
            )
        return GENERATED[name]()

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """The mkdocs hook."""
    return expand(markdown)


# Pictures the benchmarks write, shown on the site where they lie in the repository.
PICTURES = "bench/results/*.png"


def on_files(files: Any, config: Any, **_: Any) -> Any:
    """The mkdocs hook: the benchmarks' plots join the site at their repository paths
    (``bench/results/scale.png``), so pages show what the benchmarks last wrote."""
    from mkdocs.structure.files import File

    for picture in sorted(REPO.glob(PICTURES)):
        path = picture.relative_to(REPO).as_posix()
        files.append(File(path, str(REPO), config["site_dir"], config["use_directory_urls"]))
    return files
