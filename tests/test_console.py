"""The quiet CLI: while a long command runs, the screen shows one progress line; everything else is in a log."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from geoloc_ray.cli import QUIET_COMMANDS, log_path
from geoloc_ray.config import config_from_dict

SCRIPT = textwrap.dedent("""
    import logging, os, sys
    from geoloc_ray.console import announce, progress, quiet
    logging.basicConfig(level=logging.INFO)
    with quiet(sys.argv[1]):
        print("a print from python")
        os.write(2, b"bytes from C on fd 2\\n")
        logging.getLogger("ray.data").info("library INFO line")
        progress().start_stage("train", 3, 5, 120.0)
        logging.getLogger("geoloc_ray.train").info("fitting the experts")
        announce("Ray dashboard: http://127.0.0.1:8265")
        assert os.environ["GEOLOC_QUIET"] == "1"
    print("final table")
    assert "GEOLOC_QUIET" not in os.environ
""")


def test_quiet_sends_everything_but_progress_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "demo.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    logged = log.read_text()
    for line in ("a print from python", "bytes from C on fd 2", "library INFO line", "fitting the experts"):
        assert line in logged and line not in out.stdout + out.stderr.replace("fitting the experts", ""), line
    assert out.stdout == "final table\n"  # results go to stdout once the run is over
    assert "Ray dashboard: http://127.0.0.1:8265" in out.stderr  # announced on the real terminal
    assert "[3/5] train" in out.stderr and "ETA" in out.stderr


def test_quiet_commands_log_under_the_run_folder(tmp_path: Path) -> None:
    cfg = config_from_dict({"artifacts": str(tmp_path / "run")})
    assert {"pipeline", "demo"} <= set(QUIET_COMMANDS)
    path = log_path(cfg, "demo")
    assert path.startswith(str(tmp_path / "run" / "logs")) and path.endswith(".log")
    remote = config_from_dict({"artifacts": "s3://bucket/run"})
    assert not log_path(remote, "pipeline").startswith("s3://")  # a log file is written locally


def test_a_ray_job_is_never_quiet(tmp_path: Path, monkeypatch) -> None:
    """In `ray job submit` the driver's output is the job log users read: no redirection there."""
    import geoloc_ray.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run", lambda cfg, args: seen.append(__import__("os").environ.get("GEOLOC_QUIET")))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert cli.main(["pipeline", "--set", f"artifacts={tmp_path / 'run'}"]) == 0
    assert seen == [None] and not (tmp_path / "run" / "logs").exists()
