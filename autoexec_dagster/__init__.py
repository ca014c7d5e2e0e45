"""autoexec_dagster: an autonomous execution layer for Dagster."""

__all__: list[str] = []
