"""The Dagster UI shows insight lineage and execution lineage in one asset graph.

One ``churn_scores`` partition is scored and executed in this process (real SMTP sink and CRM
receiver), then the real ``dagster-webserver -w workspace.yaml`` serves the same instance: its
GraphQL API must expose the lineage and the execution summary of the partition, and headless
Chromium must render the asset graph (the screenshot is kept in ``test-artifacts/``).
"""

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from definitions import build_defs
from resources.channels import churn_channels
from resources.local_receivers import CrmReceiver, SmtpSink
from sensors import build_churn_execution_defs
from tests.browser import Chromium, find_chromium
from tests.e2e_support import (
    BIN_DIR,
    QUIET,
    REPO,
    SECRET,
    Deployment,
    free_port,
    instance_at,
    start_process,
    stop_process,
    train_and_score,
    wait_for,
)

pytestmark = pytest.mark.slow

DAY = "2026-11-05"
JOB = "churn_outreach_execution_job"
ARTIFACTS = REPO / "test-artifacts"
# What a generated customer's address looks like; none may appear unmasked in the UI's data.
RAW_EMAIL = re.compile(r"[a-z]+\.[a-z]+\d+@example\.(com|org|net)")
GRAPH_NODES = ("raw_customers", "churn_model", "churn_scores", "plan", "actions", "escalations")

METADATA_QUERY = """
query ActionsOfPartition($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: $partitions, limit: 1) {
        partition
        runId
        metadataEntries {
          __typename
          label
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
          ... on MarkdownMetadataEntry { mdStr }
          ... on BoolMetadataEntry { boolValue }
          ... on JsonMetadataEntry { jsonString }
        }
      }
    }
  }
}
"""

# Presses the community dialog's Skip button when it is up, and reports what the page shows: the
# dialog, the graph's node labels, and where each label is (equal twice running = layout done).
PAGE_STATE_JS = """
(() => {
  const text = document.body ? document.body.innerText : "";
  const skip = [...document.querySelectorAll("button")]
    .find((b) => b.textContent.trim() === "Skip");
  if (skip) skip.click();
  const names = __NAMES__;
  const layout = names.map((name) => {
    // Graph nodes are HTML inside the SVG's foreignObjects; the breadcrumb repeats a name.
    const el = [...document.querySelectorAll("foreignObject div, foreignObject span")]
      .find((e) => e.childElementCount === 0 && e.textContent.trim() === name);
    if (!el) return null;
    const r = el.getBoundingClientRect();
    return [name, Math.round(r.x), Math.round(r.y)];
  });
  return {
    skipped: Boolean(skip),
    community: text.includes("Join the Dagster community"),
    layout: layout.every((x) => x !== null) ? JSON.stringify(layout) : null,
  };
})()
""".replace("__NAMES__", json.dumps(list(GRAPH_NODES)))


@dataclass(frozen=True)
class Served:
    """A webserver on a deployment whose partition ``DAY`` was executed.

    Attributes:
        url: The webserver's base URL.
        report: The execution report of ``DAY`` (``ExecutionReport.as_dict()``).
        log: The webserver's log file.
    """

    url: str
    report: dict[str, Any]
    log: Path


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST a query to the webserver's GraphQL endpoint and return ``data``; fail on errors."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.load(response)
    assert not payload.get("errors"), payload["errors"]
    return payload["data"]


def _server_info(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    deployment = Deployment.create(tmp_path_factory.mktemp("webserver"))
    with (
        pytest.MonkeyPatch.context() as env,
        SmtpSink(deployment.mailbox) as sink,
        CrmReceiver(SECRET, deployment.crm_db) as crm,
        instance_at(deployment.home) as instance,
    ):
        env.setenv("CRM_WEBHOOK_SECRET", SECRET)
        train_and_score(instance, (DAY,))
        defs = build_defs(
            build_churn_execution_defs(
                channels=churn_channels(smtp_port=sink.port, crm_url=crm.url),
                ledger=deployment.ledger_url,
            )
        )
        result = defs.resolve_job_def(JOB).execute_in_process(
            partition_key=DAY, instance=instance, run_config=QUIET
        )
        assert result.success
        report = result.output_for_node("churn_outreach_execution", "actions")
        assert report["succeeded"] > 0
        assert sink.deliveries + crm.task_count() == report["succeeded"]
        # An idempotent re-run: it sends nothing, and its materialization is the latest one.
        rerun = defs.resolve_job_def(JOB).execute_in_process(
            partition_key=DAY, instance=instance, run_config=QUIET
        )
        assert rerun.success
        again = rerun.output_for_node("churn_outreach_execution", "actions")
        assert again["succeeded"] == 0 and again["already_done"] == report["total"]
        assert sink.deliveries + crm.task_count() == report["succeeded"]
        process_env = deployment.env(smtp_port=sink.port, crm_url=crm.url)

    url = f"http://127.0.0.1:{free_port()}"
    log = deployment.home.parent / "webserver.log"
    port = url.rsplit(":", 1)[1]
    proc = start_process(
        [str(BIN_DIR / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", port],
        env=process_env,
        log=log,
    )
    try:
        info = wait_for(
            lambda: _server_info(url),
            timeout=120,
            what="dagster-webserver to answer /server_info",
            alive=proc,
            log=log,
        )
        assert "dagster_webserver_version" in info
        yield Served(url=url, report=report, log=log)
    finally:
        stop_process(proc)


def _edges(url: str) -> set[tuple[str, str]]:
    nodes = graphql(url, "{ assetNodes { assetKey { path } dependencyKeys { path } } }")
    return {
        ("/".join(dep["path"]), "/".join(node["assetKey"]["path"]))
        for node in nodes["assetNodes"]
        for dep in node["dependencyKeys"]
    }


def test_graphql_asset_graph_joins_insight_and_execution_lineage(served: Served) -> None:
    edges = _edges(served.url)
    assert ("raw_customers", "churn_model") in edges
    assert ("churn_model", "churn_scores") in edges
    # The insight feeds the plan, and the plan the executed actions: one lineage, model to action.
    assert ("churn_scores", "churn_outreach/plan") in edges, sorted(edges)
    assert ("churn_outreach/plan", "churn_outreach/actions") in edges, sorted(edges)
    downstream = {"churn_scores"}
    while new := {b for a, b in edges if a in downstream} - downstream:
        downstream |= new
    assert {f"churn_outreach/{a}" for a in ("plan", "actions", "escalations")} <= downstream


def test_graphql_summary_metadata_of_an_executed_partition(served: Served) -> None:
    data = graphql(
        served.url,
        METADATA_QUERY,
        {"key": {"path": ["churn_outreach", "actions"]}, "partitions": [DAY]},
    )
    asset = data["assetOrError"]
    assert asset["__typename"] == "Asset"
    (materialization,) = asset["assetMaterializations"]
    assert materialization["partition"] == DAY
    entries = {e["label"]: e for e in materialization["metadataEntries"]}
    report = served.report

    # The latest materialization is the re-run's, and its headline entries are the partition's
    # totals from the ledger: what the first run did, not the re-run's zeros.
    assert entries["status"]["text"] == "completed"
    for count in ("flagged", "succeeded", "escalated", "failed"):
        assert entries[count]["intValue"] == report[count], count
    assert entries["failed"]["intValue"] == 0
    assert entries["run_succeeded"]["intValue"] == 0
    assert entries["run_already_done"]["intValue"] == report["total"]
    assert entries["open_escalations"]["intValue"] == report["escalated"] > 0
    rate = entries["autonomy_rate"]["floatValue"]
    assert rate == pytest.approx(report["autonomy_rate"])
    # The rate people read is the partition's: handled without a person over all flagged.
    handled = entries["succeeded"]["intValue"] + entries["cooled_down"]["intValue"]
    people = entries["escalated"]["intValue"] + entries["failed"]["intValue"]
    assert rate == pytest.approx(handled / (handled + people))
    by_action = json.loads(entries["by_action"]["jsonString"])
    assert {a: t["succeeded"] for a, t in by_action.items()} == {
        a: t["succeeded"] for a, t in report["by_action"].items()
    }
    # The control group is a series (holdout_fraction 0.1); no always-zero ones: it runs for real.
    assert entries["held_out"]["intValue"] == report["held_out"] > 0
    assert not {"dry_run", "pending"} & set(entries)
    assert entries["cooled_down"]["intValue"] == 0  # it has a cooldown: the zero is news
    summary = entries["summary"]["mdStr"]
    assert f"**{report['flagged']:,}** of {report['total']:,} entities flagged" in summary
    assert "handled autonomously" in summary and "0 new actions" in summary
    # Personal data stays masked everywhere the UI reads from.
    assert not RAW_EMAIL.search(json.dumps(data))


async def _screenshot_asset_graph(
    chromium: str, url: str, profile: Path, log: Path, target: Path, *, expect_dialog: bool
) -> dict[str, Any]:
    async with Chromium(chromium, profile, log) as browser:
        await browser.navigate(
            f"{url}/assets/churn_scores?view=lineage&lineageScope=neighbors&lineageDepth=3"
        )
        deadline = time.monotonic() + 90
        skipped, previous, state = False, None, {}
        while True:
            state = await browser.evaluate(PAGE_STATE_JS)
            skipped = skipped or state["skipped"]
            settled = state["layout"] is not None and state["layout"] == previous
            if settled and not state["community"] and (skipped or not expect_dialog):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the asset graph did not render: {state}, skipped={skipped}")
            previous = state["layout"]
            await asyncio.sleep(0.5)
        await browser.screenshot(target)
    return {**state, "skipped": skipped}


def test_ui_renders_the_asset_graph_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); no UI screenshot")
    # On a fresh instance the UI opens a "Join the Dagster community" dialog over the page.
    expect_dialog = graphql(served.url, "{ shouldShowNux }")["shouldShowNux"]
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "asset_graph.png"
    target.unlink(missing_ok=True)

    state = asyncio.run(
        _screenshot_asset_graph(
            chromium,
            served.url,
            tmp_path / "profile",
            tmp_path / "chromium.log",
            target,
            expect_dialog=expect_dialog,
        )
    )

    layout = json.loads(state["layout"])
    assert [name for name, _x, _y in layout] == list(GRAPH_NODES)
    # Lineage runs left to right: the model before the scores, the scores before execution.
    x = {name: left for name, left, _y in layout}
    assert x["raw_customers"] < x["churn_model"] < x["churn_scores"] < x["plan"] < x["actions"]
    if expect_dialog:
        assert state["skipped"]
        assert graphql(served.url, "{ shouldShowNux }")["shouldShowNux"] is False
    png = target.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


# Waits for the asset's partition page to show the latest materialization's metadata, presses
# the community dialog's Skip button, and reports what is visible.
METADATA_STATE_JS = """
(() => {
  const text = document.body ? document.body.innerText : "";
  const skip = [...document.querySelectorAll("button")]
    .find((b) => b.textContent.trim() === "Skip");
  if (skip) skip.click();
  return {
    skipped: Boolean(skip),
    community: text.includes("Join the Dagster community"),
    ready: text.includes("run_already_done") && text.includes("autonomy_rate")
      && text.includes("__DAY__"),
    height: document.documentElement ? document.documentElement.scrollHeight : 0,
  };
})()
""".replace("__DAY__", DAY)


async def _screenshot_partition_metadata(
    chromium: str, url: str, profile: Path, log: Path, target: Path
) -> dict[str, Any]:
    async with Chromium(chromium, profile, log) as browser:
        await browser.navigate(
            f"{url}/assets/churn_outreach/actions?view=partitions&partition={DAY}"
        )
        deadline = time.monotonic() + 90
        skipped, state = False, {}
        while True:
            state = await browser.evaluate(METADATA_STATE_JS)
            skipped = skipped or state["skipped"]
            if state["ready"] and not state["community"]:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the partition metadata did not render: {state}")
            await asyncio.sleep(0.5)
        # Scroll the metadata table into view: the headline entries sit under the summary.
        await browser.evaluate(
            """(() => { const el = [...document.querySelectorAll('td, div, span')]
                .find((e) => e.childElementCount === 0 && e.textContent.trim() === 'autonomy_rate');
              if (el) el.scrollIntoView({block: 'center'}); return Boolean(el); })()"""
        )
        # Two animation frames: the scroll has been painted before the screenshot is taken.
        await browser.evaluate(
            "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(() => done(true))))"
        )
        await browser.screenshot(target)
        text = await browser.evaluate("document.body.innerText")
    return {**state, "skipped": skipped, "text": text}


def test_ui_shows_the_partition_totals_after_a_rerun(served: Served, tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); no UI screenshot")
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "partition_metadata_after_rerun.png"
    target.unlink(missing_ok=True)

    state = asyncio.run(
        _screenshot_partition_metadata(
            chromium, served.url, tmp_path / "profile", tmp_path / "chromium.log", target
        )
    )

    text = state["text"]
    report = served.report
    assert "run_already_done" in text and "autonomy_rate" in text
    assert f"{report['succeeded']:,}" in text or str(report["succeeded"]) in text
    assert not RAW_EMAIL.search(text)
    png = target.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
