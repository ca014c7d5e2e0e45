"""``make demo``: the reference deployment's stories end to end, in one process, without the UI.

``python -m demo`` tells every story in turn; ``python -m demo churn``, ``python -m demo hosts`` or
``python -m demo stock`` or ``python -m demo campaigns`` tells one:

- churn (:mod:`demo.churn`): a churn model scores 20,000 customers for a day; retention emails
  and CRM tasks go out, complex cases go to a person; the mailbox and the CRM are checked
  against the ledger.
- hosts (:mod:`demo.hosts`): an IsolationForest flags anomalous hosts of an hour; a durable
  workflow isolates, diagnoses, remediates, verifies and reinstates them through the local
  infrastructure API (its own process), database hosts and failed remedies go to a person with
  the evidence; the API's own record is checked against the ledger.
- stock (:mod:`demo.stock`): a demand forecast finds a day's stock shortages; a workflow per SKU
  chooses the cheapest supplier that delivers in time and drafts a purchase order at the local
  supplier API; orders above 5,000 wait for procurement (emails with signed links, the command
  line), the rest go out at once; follow-ups until the supplier answers, then the inventory; the
  supplier API's record, the ledger and the inventory are checked against each other.
- campaigns (:mod:`demo.campaigns`): over simulated days, the next sends of underperforming email
  campaigns test a grid of subject lines by calls to action; a simulated audience with known true
  click rates opens and clicks through the local tracking endpoint; Thompson sampling moves the
  traffic, the winner is promoted and the learnings written; the true best is compared with the
  promoted variant, and the mailbox and the tracking endpoint with the ledger.

Run again, each story sends nothing and says so.
"""

import argparse
import datetime as dt
import sys
from collections.abc import Sequence

from demo import prepare_dagster_home
from demo.runs import say

STORIES = ("churn", "hosts", "stock", "campaigns")


def _day(value: str) -> str:
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD)") from None


def _hour(value: str) -> str:
    text = value.strip()
    for layout in ("%Y-%m-%d-%H:%M", "%Y-%m-%dT%H:%M"):
        try:
            return dt.datetime.strptime(text, layout).strftime("%Y-%m-%d-%H:00")
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(
        f"{value!r} is not an hour (YYYY-MM-DD-HH:MM, e.g. 2026-12-01-10:00)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and tell the stories it names.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit code: 0 when every story ran and its destinations agree with the ledger.
    """
    from demo.campaigns import DEFAULT_DAYS, DEFAULT_START
    from demo.churn import DEFAULT_PARTITION
    from demo.hosts import DEFAULT_HOUR
    from demo.stock import DEFAULT_DAY

    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="The reference deployment end to end: train, score, execute through Dagster, "
        "summarise, and check each destination's own record against the ledger.",
        epilog="Stories: 'churn' (retention emails and CRM tasks for one day's churn scores), "
        "'hosts' (remediation workflows for one hour's anomalous hosts, against the local "
        "infrastructure API, on an injected clock), 'stock' (purchase orders for one day's "
        "stock shortages, with approvals above 5,000, against the local supplier API, on an "
        "injected clock) and 'campaigns' (a subject-line experiment on the next sends of weak "
        "email campaigns over simulated days, against the local tracking endpoint). Without a "
        "story, all run: churn, hosts, stock, then campaigns.",
    )
    parser.add_argument(
        "story",
        nargs="?",
        choices=[*STORIES, "all"],
        default="all",
        help="the story to tell: churn, hosts, stock, campaigns, or all (default: all, in that "
        "order)",
    )
    parser.add_argument(
        "--partition",
        type=_day,
        default=DEFAULT_PARTITION,
        help=f"churn: the churn_scores day to score and act on (default {DEFAULT_PARTITION})",
    )
    parser.add_argument(
        "--hour",
        type=_hour,
        default=DEFAULT_HOUR,
        help=f"hosts: the host_anomalies hour to score and act on (default {DEFAULT_HOUR})",
    )
    parser.add_argument(
        "--day",
        type=_day,
        default=DEFAULT_DAY,
        help=f"stock: the stock_shortages day to score and act on (default {DEFAULT_DAY})",
    )
    parser.add_argument(
        "--campaign-start",
        type=_day,
        default=DEFAULT_START,
        help=f"campaigns: the first simulated day (default {DEFAULT_START})",
    )
    parser.add_argument(
        "--campaign-days",
        type=int,
        default=DEFAULT_DAYS,
        help=f"campaigns: how many days to simulate (default {DEFAULT_DAYS})",
    )
    parser.add_argument("--verbose", action="store_true", help="show Dagster's INFO logs")
    args = parser.parse_args(argv)
    stories = list(STORIES) if args.story == "all" else [args.story]

    home = prepare_dagster_home()
    say(f"instance: DAGSTER_HOME={home}")
    status = 0
    for story in stories:
        if story == "churn":
            from demo import churn

            status |= churn.run(args.partition, verbose=args.verbose)
        elif story == "hosts":
            from demo import hosts

            status |= hosts.run(args.hour, verbose=args.verbose)
        elif story == "stock":
            from demo import stock

            status |= stock.run(args.day, verbose=args.verbose)
        else:
            from demo import campaigns

            status |= campaigns.run(args.campaign_start, args.campaign_days, verbose=args.verbose)
        print()
    return status


if __name__ == "__main__":
    sys.exit(main())
