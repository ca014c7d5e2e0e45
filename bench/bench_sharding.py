"""Sharding benchmark: one partition's webhooks delivered by 1, 2 and 3 shard steps.

Target (issue 10): a partition's delivery split into N shard steps (``build_execution_defs(...,
shards=N)``, Dagster's multiprocess executor, a PostgreSQL ledger) runs >= 0.8 x N times as fast
as one shard against a latency-bound destination, and one shard delivers >= 0.7 x a raw aiohttp
loop at the same concurrency, both measured in the same run.

* The destination is a :mod:`bench.slow_server` latency server (50 ms per POST) in its own
  process, one per measurement, extended here to record when the first request arrived and the
  last one was answered, and how many requests were in flight at most: in all, and per shard
  (the shard each idempotency key hashes to, :func:`~autoexec_dagster.executor.sharding.shard_of`).
* Each shard gets the same per-shard concurrency ``C`` (16): the channel's ``max_concurrency`` is
  ``C x shards``, which the shards divide among themselves. So the ideal is ``shards x C / 50 ms``.
* The job is the real one: the insight (the execution benchmark's, 40% of the customers flagged)
  is materialized once into a ``dg.FilesystemIOManager`` folder, then for each shard count the
  partition's ``<playbook>_execution_job`` runs by ``dg.execute_job`` on a
  ``DagsterInstance.local_temp()`` (SQLite, so PostgreSQL serves the ledger only), rebuilt in
  every step process from :func:`sharded_job` (environment variables carry the ledger and
  receiver URLs). One shard is the library's in-process job with its single ``execute`` step;
  more shards are ``record``, ``deliver_0..N-1`` and ``merge`` steps, each in its own process,
  with ``max_concurrent`` raised to the shard count (Dagster's default is the core count, 2 here,
  which would run a third shard only after one of the first two).
* Every run gets a fresh PostgreSQL database for its ledger (the same partition each time). The
  ledger's load is counted from ``pg_stat_database`` (transactions and rows, read once the run's
  connections have ended so their statistics are flushed) and by a SQLAlchemy listener in every
  process of the run (statements sent to PostgreSQL); PostgreSQL's CPU from ``/proc``.
* Two timings per run: the whole job (``execute_job``, process start-up and every step
  included) and the delivery phase (first request to last answer at the receiver). The speed-up
  target is judged on the delivery phase; both are printed.
* The raw baseline: one ``aiohttp.ClientSession`` with ``C`` coroutines POSTing the same
  actions' signed bodies to the same kind of receiver, timed the same way.

Run alone: ``.venv/bin/python -m bench.bench_sharding [--actions N] [--quick]``.
"""

import argparse
import asyncio
import atexit
import collections
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import dagster as dg
import psycopg
import sqlalchemy as sa
from aiohttp import web
from psycopg import sql
from sqlalchemy import event
from sqlalchemy.pool import Pool

from autoexec_dagster import WebhookChannel, build_execution_defs
from autoexec_dagster.executor.sharding import shard_of
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.routing import route
from bench.bench_execution import ACTION, SECRET, _signed_headers, webhook_insight
from bench.bench_routing import INSIGHT, PARTITION, Check, finish, machine_busy_seconds, other_load
from bench.slow_server import SlowServer, _LatencyServer

TARGET_SPEEDUP_PER_SHARD = 0.8
TARGET_RAW_RATIO = 0.7
LATENCY_MS = 50.0
PER_SHARD_CONCURRENCY = 16
SHARD_COUNTS = (1, 2, 3)
DEFAULT_ACTIONS = 20_000
QUICK_ACTIONS = 3_000
PG_ADMIN_URL = os.environ.get("AUTOEXEC_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_ENV = "AUTOEXEC_BENCH_SHARDING_"
# Dagster's console logger at ERROR: the multiprocess executor otherwise prints every event.
_QUIET: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


# -- the code location every step process rebuilds ------------------------------------------


def _env(name: str) -> str:
    """One of the variables :func:`run_sharded` sets for the job's processes."""
    try:
        return os.environ[_ENV + name]
    except KeyError:
        raise RuntimeError(
            f"{_ENV}{name} is not set: bench.bench_sharding's job is configured by the "
            "environment of the benchmark that runs it"
        ) from None


def insight_asset() -> dg.AssetsDefinition:
    """The execution benchmark's insight as a one-partition asset (``$..._ACTIONS`` actions)."""
    actions = int(_env("ACTIONS"))

    @dg.asset(name=INSIGHT, partitions_def=dg.StaticPartitionsDefinition([PARTITION]))
    def churn_scores() -> Any:
        return webhook_insight(actions)[0]

    return churn_scores


def definitions() -> dg.Definitions:
    """The insight, its filesystem IO manager and the sharded execution layer over it."""
    asset = insight_asset()
    _, playbook = webhook_insight(int(_env("ACTIONS")))
    channel = WebhookChannel(
        url=_env("HOOK"),
        secret=SECRET,
        allowed_hosts=["127.0.0.1"],
        max_concurrency=int(_env("CONCURRENCY")),
    )
    execution = build_execution_defs(
        insight=asset,
        playbook=playbook,
        channels={ACTION: channel},
        ledger=_env("LEDGER"),
        shards=int(_env("SHARDS")),
    )
    return dg.Definitions.merge(
        dg.Definitions(
            assets=[asset],
            # Shared by every step process: the insight is read from here by each of them.
            resources={"io_manager": dg.FilesystemIOManager(base_dir=_env("IO"))},
        ),
        execution,
    )


def job_name() -> str:
    """The execution job of the benchmark's playbook."""
    return f"{webhook_insight(1)[1].name}_execution_job"


def sharded_job() -> dg.JobDefinition:
    """The partition's execution job (the ``dg.reconstructable`` target of every step process)."""
    _count_statements()
    return definitions().resolve_job_def(job_name())


# -- statements each process sends to PostgreSQL ----------------------------------------------

# Statements sent to PostgreSQL by this process, by first keyword; dumped at exit by step processes.
STATEMENTS: collections.Counter[str] = collections.Counter()
_counting = threading.Lock()
_listening = False


def _on_statement(
    conn: sa.Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    """Count one statement sent to PostgreSQL (Dagster's own SQLite storage is not counted)."""
    if conn.dialect.name != "postgresql":
        return
    verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
    with _counting:
        STATEMENTS[verb] += 1
        if executemany:
            STATEMENTS["executemany"] += 1


def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Count a pool checkout of a PostgreSQL connection: the ledger's ``pool_pre_ping`` sends a
    ``SELECT 1`` then, outside the SQLAlchemy statement events, in a transaction of its own."""
    if type(dbapi_connection).__module__.startswith("psycopg"):
        with _counting:
            STATEMENTS["PING"] += 1


def _dump_statements() -> None:
    """Write this step process's counts where the benchmark collects them."""
    folder = os.environ.get(_ENV + "COUNTS")
    if folder and STATEMENTS and str(os.getpid()) != os.environ.get(_ENV + "PARENT"):
        with contextlib.suppress(OSError):
            (Path(folder) / f"{os.getpid()}.json").write_text(json.dumps(dict(STATEMENTS)))


def _count_statements() -> None:
    """Listen to every engine of this process once (a spawned step process ends normally, so
    ``atexit`` runs there)."""
    global _listening
    if _listening or not os.environ.get(_ENV + "COUNTS"):
        return
    event.listen(sa.Engine, "before_cursor_execute", _on_statement)
    event.listen(Pool, "checkout", _on_checkout)
    atexit.register(_dump_statements)
    _listening = True


def collect_statements(folder: Path, before: Mapping[str, int]) -> dict[str, int]:
    """This process's statements since ``before`` plus those the step processes dumped."""
    total = collections.Counter({k: v - before.get(k, 0) for k, v in STATEMENTS.items()})
    for dump in folder.glob("*.json"):
        total.update(json.loads(dump.read_text()))
        dump.unlink()
    return {k: v for k, v in total.items() if v}


# -- the receiver ---------------------------------------------------------------------------


class _TimingServer(_LatencyServer):
    """The latency server, also recording the delivery window and the requests in flight."""

    name = "shard-receiver"

    def __init__(self, port: int, latency: float, shards: int) -> None:
        super().__init__(port, latency)
        self.shards = shards
        # Touched only on the server's own loop, so no lock.
        self.in_flight = 0
        self.max_in_flight = 0
        self.shard_in_flight = [0] * shards
        self.shard_max = [0] * shards
        self.shard_requests = [0] * shards
        self.shard_first: list[float | None] = [None] * shards
        self.shard_last: list[float | None] = [None] * shards
        self.first: float | None = None
        self.last: float | None = None

    def figures(self) -> dict[str, Any]:
        """Counts, in-flight maxima and the delivery window (epoch seconds)."""
        return {
            "requests": self.requests,
            "unique_keys": len(self.keys),
            "max_in_flight": self.max_in_flight,
            "first": self.first,
            "last": self.last,
            "shard_requests": self.shard_requests,
            "shard_max_in_flight": self.shard_max,
            "shard_first": self.shard_first,
            "shard_last": self.shard_last,
        }

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/stats":
            return web.Response(text=json.dumps(self.figures()), content_type="application/json")
        shard = shard_of(request.headers.get("Idempotency-Key", ""), self.shards)
        # In flight from the request's arrival to its answer: inside the sender's own window
        # (slot taken before sending, freed after reading), so a count above the cap here means
        # the sender exceeded it.
        now = time.time()
        if self.first is None:
            self.first = now
        if self.shard_first[shard] is None:
            self.shard_first[shard] = now
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.shard_in_flight[shard] += 1
        self.shard_max[shard] = max(self.shard_max[shard], self.shard_in_flight[shard])
        self.shard_requests[shard] += 1
        try:
            return await super()._handle(request)
        finally:
            self.in_flight -= 1
            self.shard_in_flight[shard] -= 1
            self.last = self.shard_last[shard] = time.time()


def serve(argv: Sequence[str]) -> None:
    """The receiver process: serve until SIGTERM, the lifetime ends, or the parent goes away."""
    parser = argparse.ArgumentParser(prog="bench.bench_sharding serve")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=LATENCY_MS)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()
    deadline = time.monotonic() + args.max_seconds
    with _TimingServer(args.port, args.latency_ms / 1000.0, args.shards) as server:
        print(f"PORT {server.port}", flush=True)
        # Woken every half second to notice the parent's exit (the process is re-parented).
        while not stop.wait(0.5):
            if time.monotonic() >= deadline or os.getppid() != parent or not server.running:
                break


class ShardReceiver(SlowServer):
    """:class:`SlowServer` running :class:`_TimingServer` (``bench.bench_sharding serve``).

    Args:
        latency_ms: Latency of every POST.
        shards: The shard count its per-shard figures hash keys into.
        max_seconds: Lifetime after which the server stops by itself.
    """

    def __init__(self, *, latency_ms: float, shards: int, max_seconds: float = 900.0):
        super().__init__(latency_ms=latency_ms, max_seconds=max_seconds)
        self.shards = shards

    def command(self) -> list[str]:
        """This module's ``serve`` command, which counts per shard."""
        return [
            sys.executable,
            "-m",
            "bench.bench_sharding",
            "serve",
            "--latency-ms",
            str(self.latency_ms),
            "--shards",
            str(self.shards),
            "--max-seconds",
            str(self.max_seconds),
        ]

    def figures(self) -> dict[str, Any]:
        """:meth:`_TimingServer.figures` of the running receiver."""
        url = f"http://127.0.0.1:{self.port}/stats"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())


# -- PostgreSQL: throwaway databases, their statistics and the server's CPU -----------------


@contextlib.contextmanager
def throwaway_database(admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A fresh PostgreSQL database (its name), dropped afterwards with its connections."""
    name = f"autoexec_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def ledger_url(database: str) -> str:
    """The ledger's SQLAlchemy URL of a database on the admin URL's server."""
    server = sa.make_url(PG_ADMIN_URL)
    return server.set(drivername="postgresql+psycopg", database=database).render_as_string(
        hide_password=False
    )


_DB_STATS = (
    "xact_commit",
    "xact_rollback",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "tup_fetched",
    "tup_returned",
)


def database_stats(database: str, admin_url: str = PG_ADMIN_URL) -> dict[str, int]:
    """``pg_stat_database`` counters of ``database``, once its connections have ended.

    A backend flushes its statistics when it exits, and otherwise only now and then; so every
    connection to the database is ended first (the run is over; later users reconnect).
    """
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchone()
            if row is None or row[0] == 0:
                break
            time.sleep(0.05)
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            f"SELECT {', '.join(_DB_STATS)} FROM pg_stat_database WHERE datname = %s",
            (database,),
        ).fetchone()
    if row is None:
        raise RuntimeError(f"no pg_stat_database row for {database}")
    return {name: int(value) for name, value in zip(_DB_STATS, row, strict=True)}


def index_reads(database: str) -> dict[str, int]:
    """Index entries read per index of ``database`` (read after :func:`database_stats`), plus
    rows read by sequential scans as ``seq:<table>``; only what was read at all."""
    url = sa.make_url(PG_ADMIN_URL).set(database=database).render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        indexes = conn.execute(
            "SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes WHERE idx_tup_read > 0"
        ).fetchall()
        tables = conn.execute(
            "SELECT relname, seq_tup_read FROM pg_stat_user_tables WHERE seq_tup_read > 0"
        ).fetchall()
    found = {str(name): int(count) for name, count in indexes}
    found.update({f"seq:{name}": int(count) for name, count in tables})
    return found


def postgres_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL process so far, ended backends included.

    A backend that ended is counted in the postmaster's children's times; the live ones by their
    own. All databases count: other users of the server show up here too.
    """
    processes: dict[int, tuple[str, int, int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, rest = (entry / "stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = rest.split()
        processes[int(entry.name)] = (
            head.split("(", 1)[1],
            int(fields[1]),
            int(fields[11]) + int(fields[12]),
            int(fields[13]) + int(fields[14]),
        )
    ticks = 0
    for comm, parent, own, children in processes.values():
        if comm != "postgres":
            continue
        ticks += own
        if processes.get(parent, ("",))[0] != "postgres":  # the postmaster
            ticks += children
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU of this process and of its children that ended (the step processes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set the job's variables (``_ENV`` + name) for this process and its children; restore."""
    saved = {name: os.environ.get(_ENV + name) for name in values}
    os.environ.update({_ENV + name: value for name, value in values.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(_ENV + name, None)
            else:
                os.environ[_ENV + name] = value


# -- the measurements -----------------------------------------------------------------------


def _window(figures: Mapping[str, Any]) -> float:
    """Seconds from the first request to the last answer at the receiver."""
    if figures["first"] is None or figures["last"] is None:
        return float("nan")
    return float(figures["last"]) - float(figures["first"])


def _step_spans(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float, int]]:
    """Start, end (epoch seconds) and process id of each step of a run."""
    starts: dict[str, tuple[float, int]] = {}
    spans: dict[str, tuple[float, float, int]] = {}
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    for entry in instance.all_logs(run_id, of_type=kinds):
        step = entry.dagster_event
        if step is None or step.step_key is None:
            continue
        if step.event_type == dg.DagsterEventType.STEP_START:
            starts[step.step_key] = (entry.timestamp, step.pid or 0)
        elif step.step_key in starts:
            started, pid = starts[step.step_key]
            spans[step.step_key] = (started, entry.timestamp, pid)
    return spans


def run_sharded(
    shards: int,
    *,
    actions: int,
    concurrency: int,
    latency_ms: float,
    instance: dg.DagsterInstance,
    folder: Path,
) -> dict[str, Any]:
    """Execute the partition's job with ``shards`` shards on a fresh PostgreSQL ledger."""
    counts = folder / f"statements-{shards}"
    counts.mkdir()
    with (
        throwaway_database() as database,
        ShardReceiver(latency_ms=latency_ms, shards=shards, max_seconds=1800) as receiver,
        environment(
            {
                "LEDGER": ledger_url(database),
                "HOOK": receiver.url,
                "SHARDS": str(shards),
                "CONCURRENCY": str(concurrency * shards),
                "COUNTS": str(counts),
                "PARENT": str(os.getpid()),
            }
        ),
    ):
        url = ledger_url(database)
        ActionLedger(url).dispose()  # the schema, created before the counters are read
        job = dg.reconstructable(sharded_job)
        # Dagster keeps the job it last loaded from a pointer (an lru_cache on the class): this
        # pointer loaded with another shard count must be loaded again, in this process too.
        type(job).get_definition.cache_clear()
        type(job).get_repository_definition.cache_clear()
        run_config: dict[str, Any] = dict(_QUIET)
        if shards > 1:
            # Dagster runs at most cpu_count() step processes at once by default (2 here).
            workers = max(shards, os.cpu_count() or 1)
            run_config["execution"] = {"config": {"multiprocess": {"max_concurrent": workers}}}
        db_before = database_stats(database)
        statements_before = dict(STATEMENTS)
        pg_cpu, server_cpu = postgres_cpu_seconds(), receiver.cpu_seconds()
        busy, cpu = machine_busy_seconds(), own_cpu_seconds()
        started_at = time.time()
        started = time.perf_counter()
        with dg.execute_job(
            job, instance, run_config=run_config, tags={"dagster/partition": PARTITION}
        ) as result:
            wall = time.perf_counter() - started
            success, run_id = result.success, result.run_id
        cpu = own_cpu_seconds() - cpu
        server_cpu = receiver.cpu_seconds() - server_cpu
        figures = receiver.figures()
        db_after = database_stats(database)
        # A fresh database: its index statistics are this run's (the schema's creation read none).
        reads = index_reads(database)
        pg_cpu = postgres_cpu_seconds() - pg_cpu
        load = other_load(machine_busy_seconds() - busy, cpu + server_cpu + pg_cpu, wall)
        statements = collect_statements(counts, statements_before)
        ledger = ActionLedger(url)
        states = ledger.summary(partition_key=PARTITION).groupby("state")["count"].sum()
        ledger.dispose()
    if not success:
        raise RuntimeError(f"the {shards}-shard execution job failed (run {run_id})")
    spans = _step_spans(instance, run_id)
    window = _window(figures)
    return {
        "shards": shards,
        "wall": wall,
        "delivery": window,
        "throughput_job": actions / wall,
        "throughput_delivery": actions / window,
        "ideal": shards * concurrency / (latency_ms / 1000.0),
        "receiver": figures,
        "first_request_after": float(figures["first"] or started_at) - started_at,
        "last_answer_before_end": started_at + wall - float(figures["last"] or started_at),
        "steps": {
            key: (start - started_at, end - start, pid) for key, (start, end, pid) in spans.items()
        },
        "ledger_states": {str(k): int(v) for k, v in states.items()},
        "db": {k: db_after[k] - db_before[k] for k in _DB_STATS},
        "statements": statements,
        "index_reads": reads,
        "client_cpu": cpu,
        "server_cpu": server_cpu,
        "postgres_cpu": pg_cpu,
        "other_load": load,
        "delivered_once": figures["requests"] == actions
        and figures["unique_keys"] == actions
        and int(states.get("succeeded", 0)) == actions,
        "in_flight_ok": figures["max_in_flight"] <= concurrency * shards,
    }


async def _raw_posts(url: str, records: Sequence[dict[str, Any]], concurrency: int) -> int:
    """POST every record, signed, with ``concurrency`` coroutines on one session; count 2xx."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=10)
    pending = iter(records)
    ok = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal ok
            # One shared iterator: the coroutines take the next record in turn (one thread).
            for record in pending:
                body = json.dumps(record, separators=(",", ":")).encode()
                headers = _signed_headers(str(record["idempotency_key"]), body)
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok += 200 <= response.status < 300

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def run_raw(
    records: Sequence[dict[str, Any]], *, concurrency: int, latency_ms: float
) -> dict[str, Any]:
    """The baseline: a raw aiohttp loop posting ``records`` at ``concurrency``."""
    with ShardReceiver(latency_ms=latency_ms, shards=1, max_seconds=1800) as receiver:
        server_cpu, busy, cpu = receiver.cpu_seconds(), machine_busy_seconds(), own_cpu_seconds()
        started = time.perf_counter()
        ok = asyncio.run(_raw_posts(receiver.url, records, concurrency))
        wall = time.perf_counter() - started
        cpu = own_cpu_seconds() - cpu
        server_cpu = receiver.cpu_seconds() - server_cpu
        load = other_load(machine_busy_seconds() - busy, cpu + server_cpu, wall)
        figures = receiver.figures()
    window = _window(figures)
    n = len(records)
    return {
        "wall": wall,
        "delivery": window,
        "throughput_job": n / wall,
        "throughput_delivery": n / window,
        "ideal": concurrency / (latency_ms / 1000.0),
        "receiver": figures,
        "client_cpu": cpu,
        "server_cpu": server_cpu,
        "other_load": load,
        "delivered_once": ok == n and figures["requests"] == n and figures["unique_keys"] == n,
        "in_flight_ok": figures["max_in_flight"] <= concurrency,
    }


def run(
    *,
    actions: int,
    concurrency: int = PER_SHARD_CONCURRENCY,
    latency_ms: float = LATENCY_MS,
    shard_counts: Sequence[int] = SHARD_COUNTS,
) -> dict[str, Any]:
    """The whole sharding benchmark; returns its figures."""
    if 1 not in shard_counts:
        raise ValueError("the shard counts must include 1, the speed-ups' baseline")
    insight, playbook = webhook_insight(actions)
    plan = route(insight, playbook, partition_key=PARTITION, insight_name=INSIGHT)
    acting = plan[plan["decision"].astype(str) == "act"]
    columns = ["customer_id", "email", "churn_score", "lifetime_value", "idempotency_key"]
    records = [{str(k): v for k, v in row.items()} for row in acting[columns].to_dict("records")]
    if len(records) != actions:
        raise RuntimeError(f"the insight routes {len(records)} actions, not {actions}")
    with tempfile.TemporaryDirectory(prefix="autoexec-bench-sharding-") as tmp:
        folder = Path(tmp)
        io_dir = folder / "io"
        (folder / "dagster").mkdir()
        with (
            environment({"ACTIONS": str(actions), "IO": str(io_dir)}),
            dg.DagsterInstance.local_temp(tempdir=str(folder / "dagster")) as instance,
        ):
            materialized = dg.materialize(
                [insight_asset()],
                partition_key=PARTITION,
                instance=instance,
                resources={"io_manager": dg.FilesystemIOManager(base_dir=str(io_dir))},
                run_config=_QUIET,
            )
            if not materialized.success:
                raise RuntimeError("the insight partition did not materialize")
            raw = run_raw(records, concurrency=concurrency, latency_ms=latency_ms)
            runs = [
                run_sharded(
                    shards,
                    actions=actions,
                    concurrency=concurrency,
                    latency_ms=latency_ms,
                    instance=instance,
                    folder=folder,
                )
                for shards in shard_counts
            ]
    single = next(r for r in runs if r["shards"] == 1)
    for r in runs:
        r["speedup_delivery"] = r["throughput_delivery"] / single["throughput_delivery"]
        r["speedup_job"] = r["throughput_job"] / single["throughput_job"]
    return {
        "actions": actions,
        "rows": len(insight),
        "concurrency": concurrency,
        "latency_ms": latency_ms,
        "raw": raw,
        "runs": runs,
        "raw_ratio": single["throughput_delivery"] / raw["throughput_delivery"],
        "raw_ratio_job": single["throughput_job"] / raw["throughput_job"],
        "other_load": max([raw["other_load"]] + [r["other_load"] for r in runs]),
    }


# -- report ---------------------------------------------------------------------------------


def _per_action(counts: Mapping[str, int], actions: int) -> str:
    """``name x.xxx`` per action for each count, largest first."""
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / actions:.3f}" for k, v in ordered if v)


def _step_name(key: str) -> str:
    """A step key without the graph and playbook prefixes (``deliver_0``, ``record``)."""
    return key.rsplit(".", 1)[-1].removeprefix(f"{webhook_insight(1)[1].name}_")


def report(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for a result of :func:`run`."""
    n, c, latency = result["actions"], result["concurrency"], result["latency_ms"]
    raw = result["raw"]
    lines = [
        f"sharded execution: {n:,} webhook actions ({result['rows']:,}-row insight) of one "
        f"partition, destination latency {latency:.0f} ms, concurrency {c} per shard "
        f"(channel max_concurrency = {c} x shards), PostgreSQL ledger, Dagster multiprocess "
        "executor for 2+ shards (one process per step), SQLite Dagster instance",
        f"  raw aiohttp loop, {c} coroutines: {raw['wall']:.2f} s, delivery "
        f"{raw['delivery']:.2f} s = {raw['throughput_delivery']:,.0f} actions/s (ideal "
        f"{raw['ideal']:,.0f}); max in flight {raw['receiver']['max_in_flight']}; CPU client "
        f"{raw['client_cpu']:.2f} s, receiver {raw['server_cpu']:.2f} s; delivered once: "
        f"{raw['delivered_once']}; other processes {raw['other_load']:.2f} cores",
    ]
    for r in result["runs"]:
        shards, figures = r["shards"], r["receiver"]
        steps = ", ".join(
            f"{_step_name(key)} +{start:.1f} s for {length:.1f} s (pid {pid})"
            for key, (start, length, pid) in sorted(r["steps"].items(), key=lambda kv: kv[1][0])
        )
        per_shard = ", ".join(
            f"shard {k}: {figures['shard_requests'][k]:,} requests, max {m} in flight"
            for k, m in enumerate(figures["shard_max_in_flight"])
        )
        db, statements = r["db"], r["statements"]
        lines += [
            f"  {shards} shard(s): job {r['wall']:.2f} s = {r['throughput_job']:,.0f} actions/s "
            f"(x{r['speedup_job']:.2f} vs 1 shard); delivery {r['delivery']:.2f} s = "
            f"{r['throughput_delivery']:,.0f} actions/s (x{r['speedup_delivery']:.2f}; ideal "
            f"{r['ideal']:,.0f}); first request {r['first_request_after']:.1f} s after the "
            f"start, last answer {r['last_answer_before_end']:.1f} s before the end",
            f"    receiver: {figures['requests']:,} requests, {figures['unique_keys']:,} keys, "
            f"max {figures['max_in_flight']} in flight (cap {c * shards}); {per_shard}; ledger "
            f"states {r['ledger_states']}; delivered once: {r['delivered_once']}",
            f"    steps: {steps}",
            f"    ledger load: {db['xact_commit']:,} commits + {db['xact_rollback']:,} rollbacks "
            f"= {(db['xact_commit'] + db['xact_rollback']) / n:.3f} transactions per action; "
            f"{sum(v for k, v in statements.items() if k not in ('executemany', 'PING')):,} "
            f"statements + {statements.get('PING', 0):,} pre-pings (per action: "
            f"{_per_action(statements, n)}); rows per action: inserted "
            f"{db['tup_inserted'] / n:.2f}, updated {db['tup_updated'] / n:.2f}, fetched "
            f"{db['tup_fetched'] / n:.1f}; index entries read per action: "
            f"{_per_action(dict(sorted(r['index_reads'].items(), key=lambda kv: -kv[1])[:3]), n)}",
            f"    CPU: bench and step processes {r['client_cpu']:.2f} s, receiver "
            f"{r['server_cpu']:.2f} s, PostgreSQL {r['postgres_cpu']:.2f} s "
            f"({r['postgres_cpu'] / n * 1e6:.0f} us per action); other processes "
            f"{r['other_load']:.2f} cores",
        ]
    lines.append(
        f"1 shard against the raw aiohttp loop: x{result['raw_ratio']:.2f} on the delivery phase "
        f"(x{result['raw_ratio_job']:.2f} on the whole job)"
    )
    lines.append(f"other processes kept up to {result['other_load']:.2f} cores busy meanwhile")
    return lines


def checks(result: dict[str, Any]) -> list[Check]:
    """The sharding targets."""
    found: list[Check] = []
    for r in result["runs"]:
        shards = r["shards"]
        if shards > 1:
            goal = TARGET_SPEEDUP_PER_SHARD * shards
            found.append(
                Check(
                    f"{shards} shards vs 1, delivery phase (whole job x{r['speedup_job']:.2f})",
                    f"x{r['speedup_delivery']:.2f}",
                    f">= x{goal:.1f}",
                    r["speedup_delivery"] >= goal,
                )
            )
    found.append(
        Check(
            "1 shard vs raw aiohttp, delivery phase",
            f"x{result['raw_ratio']:.2f}",
            f">= x{TARGET_RAW_RATIO}",
            result["raw_ratio"] >= TARGET_RAW_RATIO,
        )
    )
    every = [result["raw"], *result["runs"]]
    once = all(r["delivered_once"] for r in every)
    capped = all(r["in_flight_ok"] for r in every)
    found += [
        Check(
            "sharded: every action delivered once",
            "yes" if once else "NO",
            "requests == keys == succeeded",
            once,
        ),
        Check(
            "sharded: in flight within C x shards",
            f"max {', '.join(str(r['receiver']['max_in_flight']) for r in result['runs'])}",
            f"<= {', '.join(str(result['concurrency'] * r['shards']) for r in result['runs'])}",
            capped,
        ),
    ]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sharding benchmark alone (or, with ``serve``, its receiver); 1 if a target is
    missed."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["serve"]:
        serve(arguments[1:])
        return 0
    parser = argparse.ArgumentParser(description="a partition delivered by 1, 2 and 3 shards")
    parser.add_argument("--actions", type=int, help=f"default {DEFAULT_ACTIONS:,}")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_ACTIONS:,} actions (unless --actions)"
    )
    parser.add_argument("--concurrency", type=int, default=PER_SHARD_CONCURRENCY)
    parser.add_argument("--latency-ms", type=float, default=LATENCY_MS)
    parser.add_argument("--shards", type=int, nargs="+", default=list(SHARD_COUNTS))
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(arguments)
    actions = args.actions or (QUICK_ACTIONS if args.quick else DEFAULT_ACTIONS)
    result = run(
        actions=actions,
        concurrency=args.concurrency,
        latency_ms=args.latency_ms,
        shard_counts=args.shards,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return finish(report(result), checks(result))


if __name__ == "__main__":
    # Through the importable module, not __main__: the step processes rebuild the job from
    # ``bench.bench_sharding`` and the statement counts must be that module's.
    from bench.bench_sharding import main as module_main

    raise SystemExit(module_main())
