"""The sample outputs the documentation shows, made by real runs (``scripts/docs-samples``).

Three runs of the demo collection (Cranfield, dense + SPLADE + BM25, its queries fused
and evaluated):

1. ``embed-collections run`` with nothing configured: the embedded fleet, as the
   quickstart's ``./scripts/demo`` runs it (``docs/samples/demo.txt``), and the top of
   its ``report.html`` drawn by headless Chromium (``docs/report.png``, the README's
   picture);
2. the same job on a shared Redis with three workers started as the shared-fleet page
   says, submitted with ``--detach``. While it runs: ``queues`` and ``leases`` (two
   dense workers leasing stand-in GPUs, ``EMBED_FLEET_GPUS``, and running on the CPU,
   ``EMBED_FLEET_DEVICE=cpu``), and a third that finds both leased; then ``status --follow``
   with and without ``--json``, and ``status`` once it is done;
3. the demo on a fleet without a ``prepare`` worker: what ``run`` and its follower say.

Each output is written under ``docs/samples/`` with what belongs to this machine made
neutral: the output folder becomes ``embed-out``, the checkout ``.``, the host name
``host``. Tables are as wide as ``COLUMNS`` (100) lets them be, as in a narrow terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "docs" / "samples"
DEMO = REPO / "examples" / "cranfield"
PYTHON = sys.executable
CLI = [PYTHON, "-m", "producer.cli"]
# Give up on a run that takes this long (the demo takes about 2 minutes on 2 cores).
RUN_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Neutral:
    """What of this machine a sample must not show, and what it shows instead."""

    def __init__(self, out: Path) -> None:
        self.swaps = [
            (str(out.resolve()), "embed-out"),
            (str(out), "embed-out"),
            (str(REPO), "."),
            (socket.gethostname(), "host"),
        ]

    def __call__(self, text: str) -> str:
        return "\n".join(self._line(line) for line in text.split("\n"))

    def _line(self, line: str) -> str:
        # In a table's row a cell keeps its width, so the columns still line up.
        in_table = "│" in line
        for mine, shown in self.swaps:
            if in_table and len(shown) <= len(mine):
                shown = shown.ljust(len(mine))
            line = line.replace(mine, shown)
        return line


# A log's progress lines (one every 10 s) kept at each end of a sample; those between
# are counted in one line instead.
PROGRESS = re.compile(r"^\[\d+:\d\d\] job ")
KEPT_AT_EACH_END = 2


def abridged(text: str) -> str:
    """The sample with trailing blanks gone and its run of progress lines cut to its
    first and last few (the count of the others said in their place)."""
    lines = [line.rstrip() for line in text.splitlines()]
    at = [i for i, line in enumerate(lines) if PROGRESS.match(line)]
    if len(at) > 2 * KEPT_AT_EACH_END + 1:
        cut = at[KEPT_AT_EACH_END:-KEPT_AT_EACH_END]
        said = f"[… {len(cut)} more progress lines like these, one every 10 s …]"
        lines = [*lines[: cut[0]], said, *lines[cut[-1] + 1 :]]
    return "\n".join(lines)


def write(name: str, text: str) -> None:
    SAMPLES.mkdir(parents=True, exist_ok=True)
    (SAMPLES / name).write_text(abridged(text).strip("\n") + "\n")
    print(f"wrote docs/samples/{name} ({len(text.splitlines())} lines)")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CELERY_"))}
    return base | {"COLUMNS": "100", "HF_HUB_OFFLINE": "1"} | extra


def run(args: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


def embedded_demo(tmp: Path) -> None:
    out = tmp / "embedded"
    neutral = Neutral(out)
    done = run([*CLI, "run", str(DEMO), "--enable-sparse", "--output", str(out)], env())
    if done.returncode != 0:
        raise SystemExit(f"the demo failed ({done.returncode}):\n{done.stderr[-3000:]}")
    shown = done.stderr.replace(str(DEMO), "examples/cranfield")
    write("demo.txt", "$ ./scripts/demo\n" + neutral(shown))
    (report,) = out.glob("*/*/report.html")
    picture(report, neutral, REPO / "docs" / "report.png")


# The README's picture: the top of the demo's report.html, as headless Chromium draws it.
CHROMIUM = Path("/usr/bin/chromium")
PICTURE_SIZE = "1100,1400"


def picture(report: Path, neutral: Neutral, png: Path) -> None:
    """The report with this machine's paths made neutral, drawn to ``png`` (skipped,
    with a line, where there is no Chromium)."""
    if not CHROMIUM.exists():
        print(f"no {CHROMIUM}: {png.name} left as it is")
        return
    page = report.with_name("report-shown.html")
    page.write_text(neutral(report.read_text().replace(str(DEMO), "examples/cranfield")))
    drawn = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={report.parent / 'chromium'}", f"--window-size={PICTURE_SIZE}",
            "--virtual-time-budget=2000", f"--screenshot={png}", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    if drawn.returncode != 0:
        raise SystemExit(f"chromium could not draw the report:\n{drawn.stderr[-2000:]}")
    print(f"wrote docs/{png.name}")


# Leases on two stand-in GPUs; the models run on the CPU (there is no CUDA here).
STAND_INS = {"EMBED_FLEET_GPUS": "GPU-stand-in-0,GPU-stand-in-1", "EMBED_FLEET_DEVICE": "cpu"}
# (queues, worker name, host name, environment) of each worker of the shared fleet.
FOUR_WORKERS = (
    ("dense,rerank", "dense-gpu0", "gpu-host", STAND_INS),
    ("dense,rerank", "dense-gpu1", "gpu-host", STAND_INS),
    ("sparse,prepare", "sparse-1", "cpu-host", {}),
    ("aggregate,prepare", "aggregate", "cpu-host", {}),
)
# The earlier README's fleet: no worker on `prepare`.
NO_PREPARE = (
    ("dense,rerank", "dense-gpu0", "gpu-host", {"EMBED_FLEET_DEVICE": "cpu"}),
    ("aggregate", "aggregate", "cpu-host", {}),
)


@contextlib.contextmanager
def fleet(workers: tuple[tuple[str, str, str, dict[str, str]], ...]) -> Iterator[dict[str, str]]:
    """A private Redis and these workers, as the shared-fleet page starts them: the
    environment that reaches them. Stopped on the way out (workers first)."""
    port = free_port()
    redis_server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    started: list[subprocess.Popen[bytes]] = []
    try:
        shared = env(REDIS_URL=f"redis://127.0.0.1:{port}/0")
        for queues, name, host, extra in workers:
            command = worker_command(queues, name, host)
            started.append(
                subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=shared | extra,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield shared
    finally:
        for worker in started:
            worker.send_signal(signal.SIGTERM)
        for worker in started:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        redis_server.terminate()
        redis_server.wait(timeout=30)


def shared_fleet(tmp: Path) -> None:
    out = tmp / "shared"
    neutral = Neutral(out)
    with fleet(FOUR_WORKERS) as shared:
        submitted = run(
            [*CLI, "run", str(DEMO), "--enable-sparse", "--output", str(out), "--detach"], shared
        )
        if submitted.returncode != 0:
            raise SystemExit(f"submitting failed:\n{submitted.stderr[-3000:]}")
        job = submitted.stdout.strip().splitlines()[-1]
        busy = wait_for_dense_backlog(shared)
        write("queues.txt", "$ embed-collections queues\n" + neutral(busy))
        leases = run([*CLI, "leases"], shared)
        write("leases.txt", "$ embed-collections leases\n" + neutral(leases.stdout + leases.stderr))
        write("third-worker.txt", neutral(third_gpu_worker(shared | STAND_INS)))
        followed = run([*CLI, "status", job, "--follow"], shared)
        write(
            "follow.txt", f"$ embed-collections status {job} --follow\n" + neutral(followed.stderr)
        )
        as_json = run([*CLI, "status", job, "--follow", "--json"], shared)
        progress = [line for line in as_json.stdout.splitlines() if '"event":"progress"' in line]
        write("progress.json", neutral(dense_only(progress[-1])))
        status = run([*CLI, "status", job], shared)
        write(
            "status.txt",
            f"$ embed-collections status {job}\n" + neutral(status.stderr + status.stdout),
        )


def missing_consumer(tmp: Path) -> None:
    """The demo on a fleet with no `prepare` worker: what `run` and its follower say."""
    out = tmp / "no-prepare"
    neutral = Neutral(out)
    with fleet(NO_PREPARE) as shared:
        wait_for_workers(shared, answering=len(NO_PREPARE))
        command = [*CLI, "run", str(DEMO), "--output", str(out)]
        cli = subprocess.Popen(
            command,
            cwd=REPO,
            env=shared | {"EMBED_FLEET_QUEUE_WAIT": "30"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        said: list[str] = []
        assert cli.stderr is not None
        for line in cli.stderr:
            said.append(line)
            if "waits on queue" in line or len(said) > 200:
                break
        cli.send_signal(signal.SIGINT)  # staged by now: the job is left to the fleet
        cli.communicate(timeout=60)
        shown = "".join(line for line in said if "warning:" in line)
        shown_run = f"$ embed-collections run {DEMO.relative_to(REPO)}\n"
        write("missing-consumer.txt", shown_run + neutral(shown))


def wait_for_workers(shared: dict[str, str], answering: int) -> None:
    """Until that many workers answer the roll call (they take a few seconds to start)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answered = run([*CLI, "queues", "--json"], shared)
        if (
            answered.returncode == 0
            and json.loads(answered.stdout)["workers_answered"] >= answering
        ):
            return
        time.sleep(0.5)
    raise SystemExit(f"{answering} workers did not answer within 120 s")


def worker_command(queues: str, name: str, host: str) -> list[str]:
    """A worker as the shared-fleet page starts it, on a host of the given name: as
    root, in a UTS namespace of its own (so the samples show that name, not this
    machine's); otherwise on this machine, its name made neutral afterwards."""
    command = [PYTHON, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues]
    command += ["-c", "1", "-n", f"{name}@%h", "--loglevel", "WARNING"]
    if os.geteuid() == 0 and shutil.which("unshare"):
        return ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
    return command


def third_gpu_worker(environment: dict[str, str]) -> str:
    """A third GPU worker given the same two GPUs: its exit code and its one line."""
    done = run(worker_command("dense,rerank", "dense-gpu2", "gpu-host"), environment)
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    if done.returncode != 3 or not error:
        raise SystemExit(f"the third GPU worker did not exit 3 with an error:\n{done.stderr}")
    command = "$ celery -A workers.app worker -Q dense,rerank -c 1 -n dense-gpu2@%h"
    return f"{command}\n{error[0]}\n(exit 3)"


def wait_for_dense_backlog(fleet: dict[str, str]) -> str:
    """``queues`` once the dense queue has work waiting (the job is encoding)."""
    deadline = time.monotonic() + 300
    shown = ""
    while time.monotonic() < deadline:
        table = run([*CLI, "queues", "--json"], fleet)
        if table.returncode == 0 and json.loads(table.stdout)["queues"]["dense"]["waiting"] > 0:
            shown = run([*CLI, "queues"], fleet).stdout
            break
        time.sleep(0.5)
    if not shown:
        raise SystemExit("the dense queue never had work waiting within 300 s")
    return shown


def dense_only(line: str) -> str:
    """A progress line with only its dense stage, as the docs show it."""
    event = json.loads(line)
    event["stages"] = [s for s in event["stages"] if s["stage"] == "dense"]
    return json.dumps(event, separators=(",", ":"))


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the fleet this script started stops too


RUNS = {"embedded": embedded_demo, "shared": shared_fleet, "missing-consumer": missing_consumer}


def main() -> None:
    """Every run, or those named (``scripts/docs-samples missing-consumer``)."""
    signal.signal(signal.SIGTERM, _interrupted)
    asked = sys.argv[1:] or list(RUNS)
    if unknown := [name for name in asked if name not in RUNS]:
        raise SystemExit(f"no run named {', '.join(unknown)}; the runs: {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory(prefix="docs-samples-") as folder:
        for name in asked:
            RUNS[name](Path(folder))


if __name__ == "__main__":
    main()
