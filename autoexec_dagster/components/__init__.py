"""Dagster components of autoexec_dagster: the execution layer declared in a ``defs.yaml``.

``type: autoexec_dagster.ExecutionComponent`` (see
:class:`autoexec_dagster.components.execution_component.ExecutionComponent`).
"""
