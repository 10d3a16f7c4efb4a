"""Faults an operator's bad day brings, injected into real jobs on a fleet spread over
hosts, each at the phase where it applies; every run checked for loss and duplication.

The fleet (``tests/host_fleet.py``, root only): a services host (Redis with AOF,
SeaweedFS), two worker hosts each running a GPU-kind worker (queues ``dense,rerank``)
and a CPU-kind worker (``sparse,aggregate``) as the README's commands start them, and a
producer host. The job touches every phase: Cranfield documents with BM25, a handful of
judged queries, dense + BM25 retrieval, fusion, and a tiny CrossEncoder for reranking
(``tests/crossencoder.py``). A watcher on the producer host polls the ledger every 20 ms,
so a fault lands while its phase runs; a run whose phase was over before the fault
landed is reported as not hit.

Every run is checked by ``host_fleet.CHECKER``: every input chunk exactly once (the
chunk ids equal a clean run's), unit-norm vectors, the manifest's checksums equal the
stored objects, the manifest written last, every query in ``results.jsonl``; a poisoned
batch must leave the job ``partial`` with exactly that batch's chunks listed missing.
The time a fault adds is the run's wall time minus the median of the clean runs.

Usage: python bench/faults.py [--runs 3] [--slow-runs 1] [--fast-runs 20]
       [--faults NAME,...] [--docs 120] [--list]
Writes bench/results/faults.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from crossencoder import build_tiny_cross_encoder  # noqa: E402
from host_fleet import BUCKET, S3_PORT, Fleet, small_corpus  # noqa: E402
from hosts import Host, Network, namespaces_available  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from workers.inference.precision import cpu_flags  # noqa: E402

KINDS = {"gpu": "dense,rerank", "cpu": "sparse,aggregate,prepare"}
# The ledger status while each phase runs ("sealed": every batch staged, encode begun;
# "staging": the producer still staging).
PHASE_STATUS = {
    "encode": "running",
    "retrieve": "retrieving",
    "fuse": "fusing",
    "rerank": "reranking",
    "export": "exporting",
}

WATCHER = """
import json, sys, time
from shared.control.redis_urls import redis_client
r = redis_client(sys.argv[1], socket_timeout=1, socket_connect_timeout=1)
out = open(sys.argv[2], "a", buffering=1)
end, last = time.monotonic() + float(sys.argv[3]), ""
while time.monotonic() < end:
    try:
        jobs = r.zrevrange("embed-fleet:jobs", 0, 0)
        if jobs:
            job = jobs[0].decode()
            base = f"embed-fleet:job:{job}:"
            status, total, staged = r.hmget(base + "state", "status", "total_batches",
                                            "staged_batches")
            line = json.dumps({
                "job": job, "status": (status or b"").decode(),
                "total": int(total) if total else None, "staged": int(staged or 0),
                "dense_done": r.hlen(base + "done:dense"),
            })
            if line != last:
                out.write(f"{time.monotonic()} {line}\\n")
                last = line
    except Exception:
        pass  # Redis down or restarting: the fault under test
    time.sleep(0.02)
"""

POISON = """
import os, sys
import boto3
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
key = sys.argv[1]
s3.get_object(Bucket="BUCKET", Key=key)  # it is there ...
s3.put_object(Bucket="BUCKET", Key=key, Body=b"\\x00poison: not a batch")  # ... and now broken
"""

BATCH_IDS = """
import os, sys
import boto3, msgspec
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
body = s3.get_object(Bucket="BUCKET", Key=sys.argv[1])["Body"].read()
for chunk in msgspec.msgpack.decode(body)["chunks"]:
    print(chunk["chunk_id"])
"""


@dataclass
class Fault:
    """One fault at one phase: what is done when the phase runs, and what the job must
    end as."""

    name: str
    phase: str  # a PHASE_STATUS key, or "staging"
    inject: Callable[[Bench], None]
    slow: bool = False
    fastest: bool = False  # one of the suite's fastest faults: --fast-runs runs
    expect: str = "complete"
    resume: bool = False  # the operator runs `resume` afterwards
    what: str = ""
    sentinel: bool = False  # on a fleet whose Redis is a primary, a replica and Sentinels


@dataclass
class Run:
    fault: str
    phase: str
    run: int
    hit: bool
    wall_s: float
    ok: bool
    status: str
    problems: list[str] = field(default_factory=list)
    resumed: bool = False
    producer_exit: int | None = None


class Bench:
    """The fleet of the whole bench (started once) and the job of the current run."""

    def __init__(self, fleet: Fleet, tmp: Path, documents: int) -> None:
        self.fleet = fleet
        self.tmp = tmp
        self.corpus = small_corpus(tmp, documents)
        queries = (REPO / "examples" / "cranfield" / "queries.jsonl").read_text().splitlines()
        (tmp / "queries.jsonl").write_text("\n".join(queries[:8]) + "\n")
        self.reranker = build_tiny_cross_encoder(tmp / "reranker")
        self.watch_log = tmp / "watch.log"
        self.job_id = ""
        self.prefix = ""
        self.expected_ids: list[str] | None = None
        self.poisoned: list[str] = []

    # --- the fleet ---------------------------------------------------------------------

    def start(self) -> None:
        self.fleet.start_services()
        for host in self.fleet.workers:
            for kind, queues in KINDS.items():
                self.fleet.start_worker(host, queues, kind)
        self.wait_workers_ready()
        self.fleet.producer.start(
            [sys.executable, "-c", WATCHER, self.fleet.env["REDIS_URL"], str(self.watch_log),
             "14400"],
            self.fleet.env, self.tmp / "watcher.err", cwd=REPO,
        )  # fmt: skip

    def wait_workers_ready(self, timeout: float = 180) -> None:
        """Every worker's log says it is ready (once per start); dead ones start again,
        as a supervisor would start them."""
        for (name, kind), (proc, queues) in list(self.fleet.worker_procs.items()):
            if proc.poll() is not None:
                self.fleet.start_worker(self.host(name), queues, kind)
        deadline = time.monotonic() + timeout
        for (name, kind), _ in self.fleet.worker_procs.items():
            log = self.tmp / f"{name}-{kind}.log"
            starts = self.fleet.worker_starts.count((name, kind))
            while log.read_text(errors="replace").count(" ready.") < starts:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {kind} on {name} not ready: {log}")
                time.sleep(0.2)

    def host(self, name: str) -> Host:
        return next(h for h in self.fleet.workers if h.name == name)

    # --- one run -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        lines = self.watch_log.read_text().splitlines() if self.watch_log.exists() else []
        return json.loads(lines[-1].split(" ", 1)[1]) if lines else {}

    def wait_phase(self, phase: str, producer: subprocess.Popen[bytes], job_before: str) -> bool:
        """Until ``phase`` runs in the new job (True), or the job is past it (False)."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = self.state()
            if state.get("job") and state["job"] != job_before:
                self.job_id = state["job"]
                if _in_phase(phase, state):
                    return True
                if state["status"] in ("complete", "partial", "failed"):
                    return False
            if producer.poll() is not None:
                return False
            time.sleep(0.01)
        return False

    def run(self, fault: Fault, number: int) -> Run:
        self.wait_workers_ready()
        self.prefix = f"{fault.name}-{number}"
        job_before = self.state().get("job", "")
        log = self.tmp / f"producer-{self.prefix}.log"
        started = time.monotonic()
        producer = self.fleet.producer.start(
            [sys.executable, "-m", "producer.cli", "run", str(self.corpus), "--output",
             f"s3://{BUCKET}/{self.prefix}", "--batch-chunks", "4", "--sparse-models", "bm25",
             "--queries", str(self.tmp / "queries.jsonl"), "--rerank-model",
             str(self.reranker), "--rerank-top", "20", "--top-k", "20", "--json"],
            self.fleet.env, log, cwd=REPO,
        )  # fmt: skip
        hit = fault.phase == "none" or self.wait_phase(fault.phase, producer, job_before)
        if hit and fault.phase != "none":
            fault.inject(self)
        code = producer.wait(timeout=900)
        problems = []
        if not fault.resume and code != (0 if fault.expect == "complete" else 1):
            problems.append(f"run exited {code}: {log.read_text()[-300:]}")
        if fault.resume:
            args = ["resume", self.job_id, "--output", f"s3://{BUCKET}/{self.prefix}", "--json"]
            if fault.phase == "staging":
                args = ["run", str(self.corpus), "--resume", self.job_id, "--json"]
            done = self.fleet.cli(*args, timeout=900)
            (self.tmp / f"resume-{self.prefix}.log").write_text(done.stdout + done.stderr)
            if done.returncode != 0:
                problems.append(f"resume exited {done.returncode}: {done.stderr[-300:]}")
        wall = time.monotonic() - started
        try:
            result = self.fleet.check_output(self.prefix)
        except AssertionError as exc:  # no manifest, an unreadable artifact
            result = {"status": "unchecked"}
            problems.append(f"checker: {str(exc)[-200:]}; run: {log.read_text()[-400:]}")
        else:
            problems += self.problems(fault, result)
        return Run(
            fault=fault.name,
            phase=fault.phase,
            run=number,
            hit=hit,
            wall_s=round(wall, 1),
            ok=not problems,
            status=str(result["status"]),
            problems=problems,
            resumed=fault.resume,
            producer_exit=code,
        )

    def problems(self, fault: Fault, result: dict[str, Any]) -> list[str]:
        """Everything wrong with a run's output (empty: the run passed)."""
        found = []
        if result["status"] != fault.expect:
            found.append(f"status {result['status']}, expected {fault.expect}")
        listed_missing = len(result["missing_ids"])
        if not (result["ids"] == result["distinct"] == result["chunks"] - listed_missing):
            found.append(
                f"{result['ids']} chunks exported, {result['distinct']} distinct, "
                f"{result['chunks']} in the job, {listed_missing} listed missing"
            )
        if abs(result["norm_min"] - 1) > 1e-5 or abs(result["norm_max"] - 1) > 1e-5:
            found.append(f"norms {result['norm_min']}..{result['norm_max']}")
        if not (result["checksums_match"] and result["manifest_last"]):
            found.append("checksums or manifest order wrong")
        if result["queries"] != 8:
            found.append(f"{result['queries']} of 8 queries in results.jsonl")
        exported, missing = set(result["chunk_ids"]), set(result["missing_ids"])
        if self.expected_ids is None:
            self.expected_ids = sorted(exported)  # the first clean run defines the set
        expected = set(self.expected_ids)
        if fault.expect == "partial":
            if missing != set(self.poisoned):
                found.append(f"missing lists {len(missing)} chunks, poisoned {len(self.poisoned)}")
            if exported & missing or exported | missing != expected:
                found.append("exported + missing is not the collection, once")
        elif exported != expected:
            found.append(f"{len(expected - exported)} chunks lost, {len(exported - expected)} odd")
        return found


def _in_phase(phase: str, state: dict[str, Any]) -> bool:
    if phase == "sealed":  # every batch staged, encoding under way
        return state["status"] == "running" and state["total"] is not None
    if phase == "staging":
        return state["total"] is None and state["staged"] >= 2
    if phase == "encode":
        total = state["total"]
        return (
            state["status"] == "running"
            and total is not None
            and 2 <= state["dense_done"] <= total // 2
        )
    return bool(state["status"] == PHASE_STATUS[phase])


# --- the faults ------------------------------------------------------------------------


def kill_kind(kind: str) -> Callable[[Bench], None]:
    """kill -9 of that kind of worker on both worker hosts (whichever holds the phase's
    work dies), each started again 1 s later as a supervisor would."""

    def inject(bench: Bench) -> None:
        for host in bench.fleet.workers:
            bench.fleet.kill_worker(host, kind)
        time.sleep(1)
        for host in bench.fleet.workers:
            bench.fleet.start_worker(host, KINDS[kind], kind)

    return inject


def kill_pool(kind: str) -> Callable[[Bench], None]:
    """kill -9 of the pool processes of that kind on both hosts (the OOM killer's way):
    the worker's main process sees the death and hands the task back at once."""

    def inject(bench: Bench) -> None:
        for host in bench.fleet.workers:
            bench.fleet.kill_worker_child(host, kind)

    return inject


def lose_host(bench: Bench) -> None:
    bench.fleet.workers[0].lose()  # its workers start again before the next run


def partition(bench: Bench) -> None:
    bench.fleet.workers[0].partition()
    time.sleep(30)
    bench.fleet.workers[0].heal()


def restart_redis(bench: Bench) -> None:
    bench.fleet.shutdown_redis()
    time.sleep(4)
    bench.fleet.start_redis()


def lose_redis(bench: Bench) -> None:
    bench.fleet.lose_redis()


def s3_outage(bench: Bench) -> None:
    bench.fleet.stop_s3()
    time.sleep(60)
    bench.fleet.start_s3()


def poison(bench: Bench) -> None:
    """The last document batch, staged and not yet encoded, replaced by garbage."""
    last = bench.state()["staged"] - 1  # document batches; queries are staged apart
    key = f"{bench.prefix}/corpus/{bench.job_id}/work/batches/b{last:06d}.msgpack"
    listed = bench.fleet.producer.run(
        [sys.executable, "-c", BATCH_IDS.replace("BUCKET", BUCKET), key],
        bench.fleet.env, REPO, 60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    bench.poisoned = listed.stdout.split()
    broken = bench.fleet.producer.run(
        [sys.executable, "-c", POISON.replace("BUCKET", BUCKET), key], bench.fleet.env, REPO, 60
    )
    assert broken.returncode == 0, broken.stderr


def kill_producer(bench: Bench) -> None:
    """kill -9 of the producer's `run` while it stages (a lost laptop)."""
    for proc in bench.fleet.producer.processes:
        if "producer.cli" in " ".join(map(str, proc.args)) and proc.poll() is None:
            proc.kill()


def fail_over(bench: Bench) -> None:
    bench.fleet.fail_over()


def faults() -> list[Fault]:
    listed = [Fault("none", "none", lambda bench: None, what="no fault: the baseline")]
    phases = {
        "gpu": ("encode", "retrieve", "rerank"),
        "cpu": ("encode", "retrieve", "fuse", "export"),
    }
    for kind, where in phases.items():
        what = f"kill -9 of both {kind.upper()}-kind workers, restarted 1 s later"
        listed += [Fault(f"kill9-{kind}-worker@{p}", p, kill_kind(kind), what=what) for p in where]
    listed += [
        Fault("kill9-gpu-pool@encode", "encode", kill_pool("gpu"), fastest=True,
              what="kill -9 of the GPU-kind workers' pool processes"),
        Fault("kill9-gpu-pool@rerank", "rerank", kill_pool("gpu"), fastest=True,
              what="kill -9 of the GPU-kind workers' pool processes"),
        Fault("kill9-cpu-pool@export", "export", kill_pool("cpu"), fastest=True,
              what="kill -9 of the CPU-kind workers' pool processes"),
        Fault("host-lost@encode", "encode", lose_host,
              what="every process of worker host A killed at once"),
        Fault("redis-restart@encode", "encode", restart_redis, fastest=True,
              what="Redis SHUTDOWN (AOF) and started again 4 s later"),
        Fault("redis-lost@encode", "encode", lose_redis, resume=True,
              what="Redis killed, its data deleted, started empty; then `resume`"),
        Fault("poison@encode", "sealed", poison, expect="partial", fastest=True,
              what="a staged batch replaced by garbage before it is encoded"),
        Fault("producer-killed@staging", "staging", kill_producer, resume=True, fastest=True,
              what="kill -9 of `run` while it stages; then `run --resume`"),
        Fault("partition-30s@encode", "encode", partition, slow=True,
              what="worker host A cut off the network for 30 s"),
        Fault("s3-down-60s@encode", "encode", s3_outage, slow=True,
              what="every SeaweedFS process stopped for 60 s"),
    ]  # fmt: skip
    what = (
        "Redis behind Sentinel: kill -9 of the primary, the replica promoted, the dead one "
        "back as its replica"
    )
    listed += [
        Fault(f"sentinel-failover@{phase}", phase, fail_over, sentinel=True, what=what)
        for phase in ("encode", "export")
    ]
    return listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each fast fault")
    parser.add_argument("--slow-runs", type=int, default=1, help="runs of each slow fault")
    parser.add_argument(
        "--fast-runs",
        type=int,
        default=0,
        help="runs of each of the fastest faults (default: --runs)",
    )
    parser.add_argument("--faults", default="", help="only these (comma-separated names)")
    parser.add_argument("--docs", type=int, default=120, help="Cranfield documents per job")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs of faults not run now from the existing --out file (the "
        "baseline is this run's)",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "faults.json"))
    args = parser.parse_args()
    chosen = faults()
    if args.list:
        for fault in chosen:
            print(f"{fault.name:28} {fault.what}")
        return
    if args.faults:
        names = set(args.faults.split(","))
        chosen = [f for f in chosen if f.name in names or f.name == "none"]
    reason = namespaces_available()
    if reason:
        sys.exit(f"bench/faults.py: {reason}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs: list[Run] = []
    started = time.time()
    # A fleet of each kind the chosen faults need (one after the other: their hosts
    # share names), the baseline on the plain one.
    for sentinel in (False, True):
        group = [f for f in chosen if f.sentinel == sentinel and (f.name != "none" or not sentinel)]
        if sentinel and not group:
            continue
        runs += run_faults(group, args, sentinel)
    if args.merge and Path(args.out).exists():
        now = {r.fault for r in runs}
        kept = json.loads(Path(args.out).read_text())["runs"]
        runs += [Run(**r) for r in kept if r["fault"] not in now]
        ran = {r.fault for r in runs}
        chosen = [f for f in faults() if f.name in ran]
    report(runs, chosen, args, time.time() - started)


def run_faults(chosen: list[Fault], args: argparse.Namespace, sentinel: bool) -> list[Run]:
    """Every run of these faults on one fleet (with Sentinel, or plain Redis)."""
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        net = Network()
        try:
            bench = Bench(Fleet(net, Path(tmp), sentinel=sentinel), Path(tmp), args.docs)
            bench.start()
            bench.run(faults()[0], -1)  # warm-up: every worker loads its models, not counted
            for fault in chosen:
                count = args.slow_runs if fault.slow else args.runs
                if fault.fastest and args.fast_runs:
                    count = args.fast_runs
                for number in range(count):
                    run = bench.run(fault, number)
                    runs.append(run)
                    print(json.dumps(run.__dict__), flush=True)
        finally:
            net.close()
            for sock in Path("/tmp").glob(f"seaweedfs-*-{S3_PORT}.sock"):
                sock.unlink(missing_ok=True)
    return runs


def report(runs: list[Run], chosen: list[Fault], args: argparse.Namespace, spent: float) -> None:
    clean = [r.wall_s for r in runs if r.fault == "none" and r.ok]
    baseline = statistics.median(clean) if clean else 0.0
    rows = []
    for fault in chosen:
        mine = [r for r in runs if r.fault == fault.name]
        hit = [r for r in mine if r.hit]
        rows.append(
            {
                "fault": fault.name,
                "phase": fault.phase,
                "what": fault.what,
                "expect": fault.expect,
                "runs": len(mine),
                "hit": len(hit),
                "passed": sum(r.ok for r in mine),
                "median_wall_s": statistics.median([r.wall_s for r in mine]) if mine else None,
                "added_s": round(statistics.median([r.wall_s for r in hit]) - baseline, 1)
                if hit and fault.name != "none"
                else None,
                "problems": sorted({p for r in mine for p in r.problems}),
            }
        )
    result = {
        "benchmark": "faults",
        "documents": args.docs,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "bf16_flags": sorted({"amx_bf16", "avx512_bf16"} & cpu_flags()),
        },
        "settings": {
            "EMBED_FLEET_VISIBILITY_TIMEOUT": 8,
            "EMBED_FLEET_UNACKED_RESTORE_INTERVAL": 1,
        },
        "baseline_wall_s": baseline,
        "spent_s": round(spent),
        "faults": rows,
        "runs": [r.__dict__ for r in runs],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"faults, {args.docs} documents per job, baseline {baseline:.1f} s")
    for column in ("fault", "runs", "hit", "passed", "median s", "added s", "problems"):
        table.add_column(column, justify="left" if column in ("fault", "problems") else "right")
    for row in rows:
        table.add_row(
            row["fault"], str(row["runs"]), str(row["hit"]), str(row["passed"]),
            f"{row['median_wall_s']:.1f}" if row["median_wall_s"] is not None else "-",
            f"{row['added_s']:+.1f}" if row["added_s"] is not None else "-",
            "; ".join(row["problems"])[:60],
        )  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
