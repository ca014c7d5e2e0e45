"""Importing the library must stay cheap: heavy optional modules load only where they are used."""

import subprocess
import sys

HEAVY = ("great_expectations", "sklearn", "aiosmtpd", "scipy")


def test_import_does_not_load_heavy_modules():
    code = (
        f"import sys, autoexec_dagster; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_public_api_is_explicit():
    import autoexec_dagster

    assert sorted(autoexec_dagster.__all__) == sorted(set(autoexec_dagster.__all__))
    for name in autoexec_dagster.__all__:
        assert hasattr(autoexec_dagster, name), name
