"""The Dagster integration: execution assets, blocking insight checks, the insight sensor and job.

Start from :func:`autoexec_dagster.dagster.defs_factory.build_execution_defs`, which assembles
everything below into one ``dg.Definitions`` to merge with an existing project:

- :mod:`.execution_assets`: the op graph validate -> route -> execute -> escalate -> summarize,
  exposed as the graph-backed assets ``<playbook>/plan``, ``<playbook>/actions`` and
  ``<playbook>/escalations``;
- :mod:`.insight_checks`: Great Expectations checks on the insight that block execution;
- :mod:`.insight_sensor`: the sensor that requests one run per new insight partition holding
  flagged entities, and the optional batch schedule;
- :mod:`.metadata`: execution reports as Dagster metadata, with personal columns masked;
- :mod:`.ledger_resource`: where the action ledger lives when none is given.
"""
