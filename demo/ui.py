"""``make ui``: the reference deployment in the Dagster UI, with the daemon and local receivers.

Starts five child processes on the instance at ``$DAGSTER_HOME`` (default ``.dagster_home``,
with the project's ``dagster.yaml`` copied in when it has none):

1. the churn story's local receivers (``python -m resources.local_receivers``): the SMTP sink
   filing emails into ``var/mailbox`` and the CRM receiver, on the ports the channels use
   (``AUTOEXEC_SMTP_PORT``, ``AUTOEXEC_CRM_URL``; 8025 and 9000 by default);
2. the host story's infrastructure API (``python -m resources.infra_api``) on the port of
   ``AUTOEXEC_INFRA_API_URL`` (9100 by default), on real time with its production delays,
   keeping its record in ``var/infra.sqlite``;
3. the campaign story's tracking endpoint (``python -m resources.tracking_server``) on the port
   of ``AUTOEXEC_TRACKING_URL`` (9300 by default), recording the opens, clicks and unsubscribes
   of the campaign emails' signed links in ``var/campaign_tracking.sqlite``;
4. ``dagster-webserver -w workspace.yaml`` on http://127.0.0.1:3000;
5. ``dagster-daemon run -w workspace.yaml``, which ticks the execution and workflow sensors and
   the scoring schedules once they are switched on (or started with
   ``AUTOEXEC_SENSOR_STATUS=running``).

Ctrl-C or SIGTERM stops all five; the local destinations also stop by themselves if this process
dies.
"""

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from demo import (
    PROJECT_DIR,
    ensure_crm_secret,
    ensure_infra_secret,
    ensure_secret,
    prepare_dagster_home,
)

BIN_DIR = Path(sys.executable).parent
STARTUP_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 15.0
# Each story's insight with everything upstream (data, model) and downstream (plan, escalations,
# actions).
LINEAGE_PATHS = {
    "churn": "/assets/churn_scores?view=lineage&lineageScope=neighbors&lineageDepth=3",
    "host remediation": "/assets/host_anomalies?view=lineage&lineageScope=neighbors&lineageDepth=3",
    "campaigns": "/assets/campaign_optimisation/actions?view=lineage&lineageScope=neighbors&lineageDepth=3",
}


class Children:
    """Child processes started in order and stopped in reverse order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[str]]] = []

    def start(
        self, name: str, command: Sequence[str], *, stdout: int | None = None
    ) -> subprocess.Popen[str]:
        """Start a child in the project folder with this process's environment.

        Args:
            name: What to call it in messages.
            command: The command line.
            stdout: ``subprocess.PIPE`` to read the child's output; inherited when None.

        Returns:
            The process.
        """
        proc = subprocess.Popen(list(command), cwd=PROJECT_DIR, text=True, stdout=stdout)
        self.procs.append((name, proc))
        return proc

    def start_destination(self, name: str, module: str, *args: str) -> dict[str, Any]:
        """Start a local destination (``python -m MODULE ARGS``, owned by this process) and wait
        for its JSON ready line.

        Args:
            name: What to call it in messages ("the infrastructure API").
            module: The module to run.
            *args: Its arguments; ``--owner-pid`` is added.

        Returns:
            The ready line.
        """
        command = [sys.executable, "-m", module, *args, f"--owner-pid={os.getpid()}"]
        proc = self.start(name, command, stdout=subprocess.PIPE)
        return read_ready_line(proc, STARTUP_TIMEOUT_SECONDS, name=name)

    def exited(self) -> tuple[str, int] | None:
        """The name and exit code of the first child that has exited, if any."""
        for name, proc in self.procs:
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop_all(self) -> None:
        """SIGTERM every child still running, newest first; SIGKILL any that does not stop."""
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within {STOP_TIMEOUT_SECONDS:.0f} s; killing it")
                proc.kill()
                proc.wait()


def read_ready_line(
    proc: subprocess.Popen[str], timeout: float, *, name: str = "the local receivers"
) -> dict[str, Any]:
    """Wait for the JSON ready line a local destination prints once it listens.

    Args:
        proc: The process, started with ``stdout=subprocess.PIPE``.
        timeout: Seconds to wait.
        name: What to call it in messages.

    Raises:
        RuntimeError: The process exited or printed nothing before the deadline.
    """
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(f"{name} printed nothing within {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{name} exited with code {proc.wait()}")
    return json.loads(line)


def wait_for_webserver(url: str, proc: subprocess.Popen[str], timeout: float) -> None:
    """Poll ``/server_info`` until the webserver answers.

    Raises:
        RuntimeError: The webserver exited or did not answer before the deadline.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"dagster-webserver did not answer on {url} within {timeout:.0f} s")


def _stop(signum: int, frame: FrameType | None) -> None:
    # Unwinds through the finally that stops the children.
    raise SystemExit(128 + signum)


def run(host: str, port: int) -> int:
    """Start the receivers, the webserver and the daemon; wait until one exits or a signal.

    Args:
        host: Address the webserver binds.
        port: Port of the webserver.

    Returns:
        The exit code.
    """
    home = prepare_dagster_home()
    ensure_crm_secret()
    ensure_infra_secret()
    from resources.campaign_channels import (
        TRACKING_SECRET_ENV,
        default_tracking_url,
        tracking_db_path,
    )
    from resources.channels import crm_db_path, default_crm_url, default_smtp_port, mailbox_dir
    from resources.host_channels import default_infra_api_url, infra_db_path

    # The campaign emails' links are signed with it and the tracking endpoint checks them.
    ensure_secret(TRACKING_SECRET_ENV)

    crm_port = urlsplit(default_crm_url()).port or 80
    infra_port = urlsplit(default_infra_api_url()).port or 80
    tracking_port = urlsplit(default_tracking_url()).port or 80
    signal.signal(signal.SIGTERM, _stop)
    children = Children()
    try:
        ready = children.start_destination(
            "the local receivers",
            "resources.local_receivers",
            f"--smtp-port={default_smtp_port()}",
            f"--crm-port={crm_port}",
            f"--mailbox={mailbox_dir()}",
            f"--crm-db={crm_db_path()}",
        )
        print(f"SMTP sink on 127.0.0.1:{ready['smtp_port']} -> {ready['mailbox']}")
        print(f"CRM receiver on {ready['crm_url']} -> {ready['crm_db']}")
        api = children.start_destination(
            "the infrastructure API",
            "resources.infra_api",
            f"--port={infra_port}",
            f"--db={infra_db_path()}",
        )
        print(f"Infrastructure API on {api['url']} -> {api['db']}")
        events = children.start_destination(
            "the tracking endpoint",
            "resources.tracking_server",
            f"--port={tracking_port}",
            f"--db={tracking_db_path()}",
        )
        print(f"Campaign tracking endpoint on {events['url']} -> {events['db']}")
        workspace = str(PROJECT_DIR / "workspace.yaml")
        webserver = children.start(
            "dagster-webserver",
            [str(BIN_DIR / "dagster-webserver"), "-w", workspace, "-h", host, "-p", str(port)],
        )
        children.start("dagster-daemon", [str(BIN_DIR / "dagster-daemon"), "run", "-w", workspace])
        url = f"http://{host}:{port}"
        wait_for_webserver(url, webserver, STARTUP_TIMEOUT_SECONDS)
        print()
        print(f"Dagster UI: {url}   (instance: {home})")
        for story, path in LINEAGE_PATHS.items():
            print(f"Lineage, model to action ({story}): {url}{path}")
        print("Ctrl-C stops everything.")
        while (gone := children.exited()) is None:
            time.sleep(1.0)
        print(f"{gone[0]} exited with code {gone[1]}; stopping the rest")
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"make ui: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the UI.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m demo.ui",
        description="Dagster webserver and daemon on the reference deployment, with the local "
        "SMTP sink and CRM receiver (churn) and the infrastructure API (host remediation).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="webserver address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="webserver port (3000)")
    args = parser.parse_args(argv)
    return run(args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
