"""Helpers of the end-to-end tests: a temporary deployment, its processes and polling.

Each end-to-end test gets its own DAGSTER_HOME, var folder (ledger, mailbox, CRM database) and
receivers on free ports of 127.0.0.1, and reaches the deployment only through the environment
variables a real one reads. Processes start in their own session, so :func:`stop_process` can
end the whole group a Dagster CLI spawned (code servers, run workers) without touching anything
else.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import dagster as dg

from assets import churn_assets, churn_model, churn_scores, raw_customers

REPO = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# Small populations keep each run to seconds; the real sizes are exercised by the demo test.
TRAINING_CUSTOMERS = 4_000
DAILY_CUSTOMERS = 2_000
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

T = TypeVar("T")


@dataclass(frozen=True)
class Deployment:
    """Where one test's deployment keeps its state.

    Attributes:
        home: DAGSTER_HOME.
        var: The var folder (ledger, mailbox, CRM database).
    """

    home: Path
    var: Path

    @property
    def mailbox(self) -> Path:
        """The SMTP sink's folder."""
        return self.var / "mailbox"

    @property
    def crm_db(self) -> Path:
        """The CRM receiver's database."""
        return self.var / "crm.sqlite"

    @property
    def ledger_url(self) -> str:
        """The action ledger's URL."""
        return f"sqlite:///{self.var / 'autoexec_ledger.db'}"

    @classmethod
    def create(cls, root: Path) -> "Deployment":
        """Folders under ``root``, with the project's dagster.yaml in DAGSTER_HOME."""
        deployment = cls(home=root / "dagster_home", var=root / "var")
        deployment.home.mkdir(parents=True)
        deployment.var.mkdir(parents=True)
        shutil.copyfile(REPO / "dagster.yaml", deployment.home / "dagster.yaml")
        return deployment

    def env(self, *, smtp_port: int, crm_url: str, **extra: str) -> dict[str, str]:
        """The environment a Dagster process of this deployment runs with.

        Args:
            smtp_port: Port of the SMTP sink.
            crm_url: The CRM receiver's endpoint.
            **extra: More variables (e.g. the sensor's status and interval).

        Returns:
            This process's environment with the deployment's variables set.
        """
        return {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "AUTOEXEC_VAR_DIR": str(self.var),
            "AUTOEXEC_LEDGER_URL": self.ledger_url,
            "AUTOEXEC_SMTP_PORT": str(smtp_port),
            "AUTOEXEC_CRM_URL": crm_url,
            "CRM_WEBHOOK_SECRET": SECRET,
            **extra,
        }


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for CLIs that need a number up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train_and_score(instance: dg.DagsterInstance, days: tuple[str, ...]) -> None:
    """Train the churn model once, then materialize ``churn_scores`` for each day.

    Raises:
        AssertionError: A run failed.
    """
    trained = dg.materialize(
        churn_assets,
        instance=instance,
        selection=[raw_customers, churn_model],
        run_config={
            **QUIET,
            "ops": {"raw_customers": {"config": {"n_customers": TRAINING_CUSTOMERS}}},
        },
    )
    assert trained.success
    for day in days:
        scored = dg.materialize(
            churn_assets,
            instance=instance,
            selection=[churn_scores],
            partition_key=day,
            run_config={
                **QUIET,
                "ops": {"churn_scores": {"config": {"n_customers": DAILY_CUSTOMERS}}},
            },
        )
        assert scored.success


# The deployment's settings: a demo under test must not see the developer's own.
DEPLOYMENT_ENV_PREFIXES = ("AUTOEXEC_", "CRM_", "INFRA_", "SUPPLIER_", "CAMPAIGN_")


def run_demo(args: list[str], *, home: Path, var: Path, timeout: float) -> str:
    """Run ``python -m demo ARGS`` on its own DAGSTER_HOME and var folder; its stdout.

    Fails the test when the demo exits non-zero or prints a traceback.
    """
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(DEPLOYMENT_ENV_PREFIXES)},
        "DAGSTER_HOME": str(home),
        "AUTOEXEC_VAR_DIR": str(var),
    }
    result = subprocess.run(
        [sys.executable, "-m", "demo", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def start_process(command: list[str], *, env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """Start a process in the repository, in a session of its own, logging to a file."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a process started by :func:`start_process` and everything it spawned.

    SIGTERM first, so Dagster shuts its code servers down cleanly; then SIGKILL to the process
    group, which catches any child that outlived its parent.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.5,
    alive: subprocess.Popen | None = None,
    log: Path | None = None,
) -> T:
    """Poll ``probe`` until it returns something other than None or the deadline passes.

    Args:
        probe: Returns None while the awaited state is not reached.
        timeout: Seconds before giving up.
        what: The awaited state, for the failure message.
        interval: Seconds between two probes.
        alive: A process that must keep running meanwhile; its exit fails at once.
        log: The process's log, quoted in failure messages.

    Returns:
        The probe's first non-None result.

    Raises:
        AssertionError: The deadline passed or ``alive`` exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if alive is not None and alive.poll() is not None:
            raise AssertionError(
                f"process exited with {alive.returncode} while waiting for {what}{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{_tail(log)}")
        time.sleep(interval)


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- log tail ---\n" + "\n".join(text)


@contextlib.contextmanager
def instance_at(home: Path) -> Iterator[dg.DagsterInstance]:
    """The Dagster instance in ``home``, as ``DagsterInstance.get()`` would open it there."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance
