"""The Prefect servers cloob starts (the ephemeral one of `cloob demo` / `cloob study`) and the one
whose command the demo prints send no telemetry: offline, Prefect's telemetry service only logs
`Failed to send telemetry`, and nobody asked for it online either."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import child_env

ROOT = Path(__file__).parents[1]


def test_the_ephemeral_prefect_has_telemetry_off(tmp_path):
    # A fresh process: Prefect reads its settings once, when first imported.
    code = ("import sys; from flows.demo import _use_ephemeral_prefect; _use_ephemeral_prefect(sys.argv[1]); "
            "import os; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.analytics_enabled, os.environ['DO_NOT_TRACK'])")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "prefect")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=child_env(env))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "1"]


def test_the_server_command_the_demo_prints_has_telemetry_off():
    from flows.demo import local_server_command

    command = local_server_command("/s/prefect")
    assert command.startswith("PREFECT_HOME=/s/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false ")
    assert command.index("PREFECT_SERVER_ANALYTICS_ENABLED=false") < command.index("prefect server start")
