"""Sharing a fleet: how jobs of different sizes and priorities take turns on one dense
worker, against each job alone on the same fleet, in the same run.

The fleet: a private Redis, one ``dense`` worker and one ``aggregate,prepare`` worker,
real processes (``producer.local_fleet``), a new one for each run below, warmed up by a
20-document job first (its workers have loaded their model, as on a fleet that is up);
each job is ``embed-collections run`` as a user runs it (MiniLM, the default model),
output to a local folder.

- **alone**: job A (``--scale`` copies of Cranfield) and job B (``--small`` documents
  of Cranfield), each with ids of its own, each alone on the fleet;
- **shared**: A, then B submitted once A has encoded ``--b-after`` dense units: B's wall
  against B alone, A's against A alone, and the makespan (A's start to the last end)
  against A alone + B alone (the same jobs in sequence);
- **urgent**: the same with B at ``--priority urgent``;
- **equal**: three jobs of ``--equal`` Cranfield documents (new ids) started together:
  the spread of their walls ((max - min) / mean);
- **missing consumer**: a job on a fleet with no ``prepare`` worker: seconds until
  ``run`` names the queue (before it enqueues), and until its follower does once the
  job has waited ``EMBED_FLEET_QUEUE_WAIT`` (30 s) on it.

Each shared run samples every job's dense progress (chunks done / staged) every 0.5 s
for the plot.

Usage: python bench/sharing.py [--scale 10] [--small 300] [--equal 1400] [--b-after 5]
(``--equal-only`` or ``--missing-only``: that part alone, into the results written)
Writes bench/results/sharing.json and bench/results/sharing.png, and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import REPO
from rich.console import Console
from rich.table import Table
from scale import CRANFIELD

from producer.local_fleet import LocalFleet
from shared.control.ledger import JOBS_INDEX, JobLedger, connect
from workers.inference.precision import cpu_flags

RESULTS = REPO / "bench" / "results"
WARMUP = 20
"""Documents of the job each fleet runs before it is measured."""
TARGETS = {"b_equal": 2.5, "b_urgent": 1.3, "makespan": 1.05, "equal_spread": 0.15, "named": 35}


class Job:
    """One ``embed-collections run`` on the fleet, in the background."""

    def __init__(self, name: str, source: Path, out: Path, env: dict[str, str], *extra: str):
        self.name = name
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "run", str(source), "--output",
             str(out / name), "--json", *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.stdout: list[str] = []
        # Both pipes read as they fill: the live view's JSON snapshots fill a pipe's
        # buffer long before a long job ends, and a producer that cannot write waits.
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.ended = 0.0

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.started, line.rstrip()))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.readlines()
        # Its end, whenever that is: jobs waited for in turn may end in another order.
        self.proc.wait()
        self.ended = time.monotonic()

    def wait(self) -> float:
        """Its wall time, once it ended (the job must complete)."""
        self.proc.wait(timeout=3600)
        for reader in self._readers:
            reader.join(timeout=10)
        if self.proc.returncode != 0:
            tail = "\n".join(line for _, line in self.lines[-30:])
            sys.exit(f"job {self.name} failed ({self.proc.returncode}):\n{tail}")
        return self.ended - self.started


class Progress(threading.Thread):
    """Every 0.5 s, each job's dense chunks done over its staged chunks, by source name."""

    def __init__(self, redis_url: str, origin: float) -> None:
        super().__init__(daemon=True)
        self.client = connect(redis_url)
        self.origin = origin
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for raw in self.client.zrange(JOBS_INDEX, 0, -1):
                ledger = JobLedger(self.client, raw.decode())
                snap = ledger.progress()
                dense = next((s for s in snap.stages if s.stage == "dense"), None)
                if dense is None or not snap.staged_chunks:
                    continue
                name = Path(ledger.spec().source).stem
                if name == "warmup":
                    continue
                at = round(time.monotonic() - self.origin, 2)
                done = round(dense.chunks_done / snap.staged_chunks, 4)
                self.samples.setdefault(name, []).append((at, done))


def dense_units_done(redis_url: str, name: str) -> int:
    client = connect(redis_url)
    for raw in client.zrange(JOBS_INDEX, 0, -1):
        ledger = JobLedger(client, raw.decode())
        if Path(ledger.spec().source).stem == name:
            return len(ledger.reports("dense"))
    return 0


def fleet_env(fleet: LocalFleet) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    return {**inherited, "REDIS_URL": fleet.redis_url, "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def warm_fleet(out: Path) -> Iterator[LocalFleet]:
    """A fleet of one dense and one aggregate+prepare worker that has run a warm-up job
    of :data:`WARMUP` documents: its workers have loaded their model and tokenizer, as
    on a fleet that is up, so no measured job pays for that."""
    with LocalFleet(("dense", "aggregate,prepare")) as fleet:
        warmup = copy_of(WARMUP, "warmup", 1000, out.parent)
        Job("warmup", warmup, out, fleet_env(fleet)).wait()
        yield fleet


def alone(source: Path, out: Path) -> float:
    with warm_fleet(out) as fleet:
        return Job(source.stem, source, out, fleet_env(fleet)).wait()


def shared(a: Path, b: Path, out: Path, b_after: int, *b_extra: str) -> dict[str, Any]:
    """A, then B once A has ``b_after`` dense units done."""
    with warm_fleet(out) as fleet:
        env = fleet_env(fleet)
        progress = Progress(fleet.redis_url, time.monotonic())
        progress.start()
        job_a = Job(a.stem, a, out, env)
        deadline = time.monotonic() + 1800
        while dense_units_done(fleet.redis_url, a.stem) < b_after:
            if time.monotonic() > deadline or job_a.proc.poll() is not None:
                sys.exit("job A never encoded (or ended before B could be sent)")
            time.sleep(0.2)
        job_b = Job(b.stem, b, out, env, *b_extra)
        wall_b = job_b.wait()
        wall_a = job_a.wait()
        progress.stop.set()
    return {
        "a_wall_s": round(wall_a, 1),
        "b_wall_s": round(wall_b, 1),
        "b_sent_at_s": round(job_b.started - job_a.started, 1),
        "makespan_s": round(max(job_a.ended, job_b.ended) - job_a.started, 1),
        "progress": progress.samples,
    }


def equal(sources: list[Path], out: Path) -> dict[str, Any]:
    with warm_fleet(out) as fleet:
        env = fleet_env(fleet)
        progress = Progress(fleet.redis_url, time.monotonic())
        progress.start()
        jobs = [Job(s.stem, s, out, env) for s in sources]
        walls = [job.wait() for job in jobs]
        progress.stop.set()
    mean = sum(walls) / len(walls)
    return {
        "walls_s": [round(w, 1) for w in walls],
        "spread": round((max(walls) - min(walls)) / mean, 3),
        "progress": progress.samples,
    }


def missing_consumer(source: Path, out: Path) -> dict[str, Any]:
    """A job on a fleet with no ``prepare`` worker: when ``run`` names the queue."""
    with LocalFleet(("dense", "aggregate")) as fleet:
        job = Job("unconsumed", source, out, fleet_env(fleet))
        deadline = time.monotonic() + 120
        named: list[float] = []
        while time.monotonic() < deadline and len(named) < 2:
            named = [at for at, line in job.lines if "which no worker consumes" in line]
            time.sleep(0.2)
        job.proc.kill()
        job.proc.wait()
    if not named:
        sys.exit("the missing prepare consumer was never named")
    return {
        "before_enqueue_s": round(named[0], 1),
        "follower_s": round(named[1], 1) if len(named) > 1 else None,
    }


def copy_of(docs: int, name: str, start: int, folder: Path) -> Path:
    """``docs`` Cranfield documents from ``start`` (wrapping), new ids, as ``name``."""
    records = [json.loads(x) for x in CRANFIELD.read_text().splitlines() if x.strip()]
    path = folder / f"{name}.jsonl"
    with path.open("w") as out:
        for n in range(docs):
            r = records[(start + n) % len(records)]
            line = {"id": f"{name}-{n}", "title": r.get("title", ""), "text": r["text"]}
            out.write(json.dumps(line) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=10, help="job A: copies of Cranfield")
    parser.add_argument("--small", type=int, default=300, help="job B: documents")
    parser.add_argument("--equal", type=int, default=1400, help="each equal job: documents")
    parser.add_argument("--b-after", type=int, default=5, help="A's dense units before B")
    parser.add_argument(
        "--equal-only",
        action="store_true",
        help="run only the three equal jobs, into the sharing.json already written",
    )
    parser.add_argument(
        "--missing-only",
        action="store_true",
        help="run only the missing consumer, into the sharing.json already written",
    )
    args = parser.parse_args()
    if args.equal_only:
        equal_only(args.equal)
        return
    if args.missing_only:
        missing_only(args.small)
        return
    console = Console()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="embed-fleet-sharing-") as tmp:
        folder = Path(tmp)
        a = copy_of(1400 * args.scale, "a", 0, folder)
        b = copy_of(args.small, "b", 400, folder)
        equals = [copy_of(args.equal, f"equal{i}", 0, folder) for i in range(3)]
        out = folder / "out"
        console.print("A alone ...")
        a_alone = alone(a, out)
        console.print("B alone ...")
        b_alone = alone(b, out)
        console.print("A and B ...")
        same = shared(a, b, out, args.b_after)
        console.print("A and B urgent ...")
        urgent = shared(a, b, out, args.b_after, "--priority", "urgent")
        console.print("three equal jobs ...")
        three = equal(equals, out)
        console.print("a missing consumer ...")
        unconsumed = missing_consumer(b, out)
    sequence = a_alone + b_alone
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        },
        "jobs": {
            "a_documents": 1400 * args.scale,
            "b_documents": args.small,
            "equal_documents": args.equal,
            "b_after_dense_units": args.b_after,
        },
        "alone": {"a_wall_s": round(a_alone, 1), "b_wall_s": round(b_alone, 1)},
        "shared": same,
        "urgent": urgent,
        "equal": three,
        "missing_consumer": unconsumed,
        "ratios": {
            "b_equal": round(same["b_wall_s"] / b_alone, 2),
            "b_urgent": round(urgent["b_wall_s"] / b_alone, 2),
            "a_equal": round(same["a_wall_s"] / a_alone, 2),
            "makespan_equal": round(same["makespan_s"] / sequence, 3),
            "makespan_urgent": round(urgent["makespan_s"] / sequence, 3),
        },
        "targets": TARGETS,
        "bench_s": round(time.time() - started),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sharing.json").write_text(json.dumps(result, indent=2) + "\n")
    report(result, console)
    plot(result, RESULTS / "sharing.png")


def equal_only(documents: int) -> None:
    """The three equal jobs again, their figures replacing those in sharing.json."""
    path = RESULTS / "sharing.json"
    result = json.loads(path.read_text())
    with tempfile.TemporaryDirectory(prefix="embed-fleet-sharing-") as tmp:
        folder = Path(tmp)
        equals = [copy_of(documents, f"equal{i}", 0, folder) for i in range(3)]
        result["equal"] = equal(equals, folder / "out")
    result["jobs"]["equal_documents"] = documents
    path.write_text(json.dumps(result, indent=2) + "\n")
    report(result, Console())
    plot(result, RESULTS / "sharing.png")


def missing_only(documents: int) -> None:
    """The missing consumer again, its figures replacing those in sharing.json."""
    path = RESULTS / "sharing.json"
    result = json.loads(path.read_text())
    with tempfile.TemporaryDirectory(prefix="embed-fleet-sharing-") as tmp:
        folder = Path(tmp)
        source = copy_of(documents, "b", 400, folder)
        result["missing_consumer"] = missing_consumer(source, folder / "out")
    path.write_text(json.dumps(result, indent=2) + "\n")
    report(result, Console())


def report(result: dict[str, Any], console: Console) -> None:
    ratios, alone_, same, urgent = (
        result["ratios"],
        result["alone"],
        result["shared"],
        result["urgent"],
    )
    table = Table(title="Sharing one dense worker (walls in s; ratio against alone)")
    for column in ("what", "wall", "alone", "ratio", "target"):
        table.add_column(column, justify="left" if column == "what" else "right")
    rows = [
        ("B beside A, normal", same["b_wall_s"], alone_["b_wall_s"], ratios["b_equal"], "≤ 2.5"),
        ("B beside A, urgent", urgent["b_wall_s"], alone_["b_wall_s"], ratios["b_urgent"], "≤ 1.3"),
        ("A beside B", same["a_wall_s"], alone_["a_wall_s"], ratios["a_equal"], "-"),
        (
            "makespan vs in sequence",
            same["makespan_s"],
            round(alone_["a_wall_s"] + alone_["b_wall_s"], 1),
            ratios["makespan_equal"],
            "≤ 1.05",
        ),
    ]
    for what, wall, base, ratio, target in rows:
        table.add_row(what, f"{wall:,.1f}", f"{base:,.1f}", f"{ratio:.2f}", target)
    console.print(table)
    three, missing = result["equal"], result["missing_consumer"]
    console.print(
        f"three equal jobs: walls {three['walls_s']} s, spread {three['spread']:.1%} (target ≤ 15%)"
    )
    console.print(
        f"a missing prepare consumer named {missing['before_enqueue_s']} s after `run` "
        f"started (before enqueueing) and by the follower at {missing['follower_s']} s "
        "(target ≤ 35 s)"
    )
    console.print(f"cpu: {result['machine']['cpu_flags']}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [
        ("B normal beside A", "shared"),
        ("B urgent beside A", "urgent"),
        ("three equal", "equal"),
    ]
    fig, axes = plt.subplots(1, len(runs), figsize=(15, 4.2), sharey=True)
    for ax, (title, key) in zip(axes, runs, strict=True):
        for name, samples in sorted(result[key]["progress"].items()):
            if samples:
                xs, ys = zip(*samples, strict=True)
                ax.plot(xs, [100 * y for y in ys], label=name)
        ax.set_title(title)
        ax.set_xlabel("seconds since the first job started")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("dense chunks done (%)")
    fig.suptitle("Each job's dense progress on one shared dense worker")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
