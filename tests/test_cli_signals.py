"""A command that runs flows in process ends on SIGTERM through its exit handlers (no orphaned server)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_sigterm_runs_exit_handlers_of_a_flow_process() -> None:
    # Prefect stops its temporary server from an exit handler; SIGTERM's default action would skip it.
    script = textwrap.dedent(
        """
        import atexit, os, signal, time
        from flows.cli.app import prepare_flow_process
        prepare_flow_process()
        atexit.register(lambda: print("exit handlers ran", flush=True))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + 15, done.stderr
    assert "exit handlers ran" in done.stdout
