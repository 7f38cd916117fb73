"""The Prefect UI workflow of docs/ui.md, in a real browser (headless Chromium driven by Playwright).

`bvpo serve` on configs/tiny.yaml (which starts its own local Prefect server, as `make serve` does), then,
in the browser only: the Deployments page lists `data-refresh` with its cron schedule; a *Custom run* of it
with `prompts.num_prompts` changed in the form; the run's page shows it Completed; its Artifacts tab holds
the dataset table, which is opened and read. Last, `bvpo sql` on the run's workspace must show exactly
those datasets, registered by that run, built with the number of prompts the form set.

Screenshots of every step (and of a failing step, with the page's HTML) go to test-artifacts/ui/
(`BVPO_UI_ARTIFACTS` to move them), with the log of `bvpo serve`. Chromium is Debian's package
(/usr/bin/chromium, `BVPO_CHROMIUM` to change; `playwright install` is never used). Without Chromium or
Playwright the test fails; `BVPO_SKIP_BROWSER=1` skips it on request.

A second, fast test (no browser) pins the bug this test found: `bvpo serve` registering its deployments on a
temporary Prefect server instead of the local server it had started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BVPO = str(Path(sys.executable).with_name("bvpo"))
CHROMIUM = os.environ.get("BVPO_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("BVPO_UI_ARTIFACTS", ROOT / "test-artifacts" / "ui"))
DATA_KINDS = {"prompts", "generations", "scores", "pairs_trace", "pairs_empty", "ref_logps"}
NUM_PROMPTS = 8  # set in the run form; configs/tiny.yaml (the served default) has 16
STEP_TIMEOUT_MS = 30_000  # any single UI action or element
SERVE_TIMEOUT_S = 180  # server healthy and deployments registered
RUN_TIMEOUT_S = 540  # the data-refresh run, submission to final state: ≈75 s alone, minutes on a busy CPU
FINAL_STATES = {"Completed", "Failed", "Crashed", "Cancelled", "TimedOut"}


def _require_browser() -> None:
    """Skip only on explicit request; a missing browser or Playwright is a failure, never a silent skip."""
    if os.environ.get("BVPO_SKIP_BROWSER", "").strip().lower() in ("1", "true", "yes"):
        pytest.skip("BVPO_SKIP_BROWSER is set: the Prefect UI browser test is skipped on request")
    problems = []
    if importlib.util.find_spec("playwright") is None:
        problems.append("the Python package 'playwright' is missing (pip install -e '.[dev]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"no Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)")
    if problems:
        pytest.fail(
            "the browser test cannot run: " + "; ".join(problems) + ". Set BVPO_SKIP_BROWSER=1 to skip it.",
            pytrace=False,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """`bvpo serve` on the tiny config, with the local Prefect server it starts (one process group)."""

    def __init__(self, tmp: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workspace = tmp / "workspace"
        self.log = log
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # pick up the UI's run within 2 s (default 10)
            "PREFECT_API_LOG_RETRYABLE_ERRORS": "true",  # log the errors the API answers with 503
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        for key in ("PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_UI_URL"):
            env.pop(key, None)
        command = [
            BVPO,
            "serve",
            "-c",
            str(ROOT / "configs" / "tiny.yaml"),
            "-s",
            f"workspace={self.workspace}",
        ]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def run_lines(self, count: int = 15) -> str:
        """The last flow-run and task-run lines of the log (states and errors of the runs)."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join([line for line in lines if re.search(r"\| (Flow|Task) run '", line)][-count:])

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bvpo serve exited with code {self.proc.returncode}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(
            f"the Prefect server of bvpo serve did not answer at {self.url} in {SERVE_TIMEOUT_S} s"
        )

    def stop(self) -> None:
        """SIGTERM the process group this test started (serve, its server, flow-run processes)."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@contextmanager
def _serving(tmp_path: Path) -> Iterator[Served]:
    """`bvpo serve` running for the duration of the block; a fresh artifacts directory."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.html")]:
        old.unlink()
    stack = Served(tmp_path, ARTIFACTS / "serve.log")
    try:
        yield stack
    finally:
        stack.stop()


class Steps:
    """Numbered screenshots; a failing step saves a screenshot and the page's HTML and names the step."""

    def __init__(self, page: Any, served: Served) -> None:
        self.page = page
        self.served = served
        self.count = 0

    def shot(self, name: str) -> Path:
        self.count += 1
        path = ARTIFACTS / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path))
        return path

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            shot = ARTIFACTS / f"FAILED-{slug}.png"
            with suppress(Exception):
                self.page.screenshot(path=str(shot), full_page=True)
                (ARTIFACTS / f"FAILED-{slug}.html").write_text(self.page.content())
            pytest.fail(
                f"UI step '{name}' failed: {type(exc).__name__}: {exc}\n"
                f"page: {self.page.url}\nscreenshot: {shot}\n"
                f"--- bvpo serve log: runs ---\n{self.served.run_lines()}\n"
                f"--- bvpo serve log: tail ---\n{self.served.log_tail()}",
                pytrace=False,
            )


def _state(page: Any) -> str:
    """The state badge of the flow-run page's heading (Running, Completed, ...)."""
    return (
        page.locator(".page-heading-flow-run .state-badge").first.inner_text(timeout=STEP_TIMEOUT_MS).strip()
    )


def _bvpo_sql(workspace: Path, query: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [BVPO, "sql", "-w", str(workspace), query, "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"bvpo sql failed ({proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


@pytest.mark.browser
@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_data_refresh_custom_run_from_the_ui(tmp_path: Path) -> None:
    _require_browser()  # before anything starts: skip on request, fail if the browser is missing
    with _serving(tmp_path) as served:
        _ui_workflow(served)


def test_serve_points_prefect_at_the_local_server_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bvpo serve` without PREFECT_API_URL imports Prefect (validating its options) before it starts its
    local server; Prefect must then use that server, not a temporary one of its own (which the UI never
    sees). Fast: the server process and its health check are faked."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL

    import flows.cli.server as cli
    import flows.deployments  # noqa: F401  (Prefect is imported and has read its settings)

    class FakeServer:
        returncode = None

        def poll(self) -> None:
            return None

    monkeypatch.setattr(cli.subprocess, "Popen", lambda *args, **kwargs: FakeServer())
    monkeypatch.setattr(httpx, "get", lambda *args, **kwargs: httpx.Response(200))
    try:
        cli._start_local_server("127.0.0.1", 4999)
        assert PREFECT_API_URL.value() == "http://127.0.0.1:4999/api"
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        refresh_global_settings_context()


def _ui_workflow(served: Served) -> None:
    """The steps of docs/ui.md, each failing with its name and a screenshot."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import sync_playwright

    from flows.deployments import DATA_REFRESH

    started = time.monotonic()
    print(f"UI screenshots: {ARTIFACTS}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(
            viewport={"width": 1400, "height": 900}, timezone_id="UTC", locale="en-US"
        )
        page = context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        _log_browser_errors(page, ARTIFACTS / "browser.log")
        steps = Steps(page, served)
        try:
            with steps.step("start bvpo serve and its Prefect server"):
                served.wait_healthy()

            with steps.step(f"deployments list shows '{DATA_REFRESH}' with its schedule"):
                link = page.get_by_role("link", name=DATA_REFRESH, exact=True)
                deadline = time.monotonic() + SERVE_TIMEOUT_S
                serving_since = None
                page.goto(f"{served.url}/deployments")
                while True:  # bvpo serve registers the deployments once the server is up
                    with suppress(PlaywrightTimeoutError):
                        link.wait_for(timeout=5000)
                        break
                    assert served.proc.poll() is None, f"bvpo serve exited ({served.proc.returncode})"
                    if serving_since is None and "deployments are being served" in served.log_tail(100_000):
                        serving_since = time.monotonic()
                    assert serving_since is None or time.monotonic() - serving_since < 20, (
                        f"bvpo serve is serving its deployments, but the UI does not list '{DATA_REFRESH}'"
                    )
                    assert time.monotonic() < deadline, (
                        f"deployment '{DATA_REFRESH}' is not listed after {SERVE_TIMEOUT_S} s"
                    )
                    page.reload()
                row = page.locator("tr", has=link)
                expect_text(row, "03:00 AM every day")  # the served cron 0 3 * * * (UTC)
                expect_text(row, "data_refresh")  # its flow (loaded after the deployments)
                steps.shot("deployments")

            with steps.step(f"open the '{DATA_REFRESH}' deployment"):
                link.click()
                page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}"))
                expect_text(page.locator(".page-heading").first, DATA_REFRESH)
                page.get_by_text("At 03:00 AM every day").first.wait_for()
                steps.shot("deployment")

            run_name = f"ui-browser-{os.getpid()}-{int(time.time())}"
            with steps.step("fill the custom run form"):
                page.get_by_role("button", name="Run", exact=True).click()
                page.get_by_text("Custom run", exact=True).click()
                page.wait_for_url(re.compile(r"/run(\?|$)"))
                page.locator(".flow-run-name-input input").fill(run_name)
                workspace = Path(_form_field(page, "Workspace", "textarea").input_value())
                assert workspace == served.workspace, f"the form's workspace is {workspace}"
                prompts = _form_field(page, "Num Prompts", "input[type=number]")
                assert prompts.input_value() == "16", f"served default num_prompts: {prompts.input_value()}"
                prompts.fill(str(NUM_PROMPTS))
                prompts.blur()
                assert prompts.input_value() == str(NUM_PROMPTS)
                prompts.scroll_into_view_if_needed()
                steps.shot("custom-run-form")

            with steps.step("submit the custom run and open it"):
                for _attempt in range(3):
                    with page.expect_response(
                        lambda r: r.request.method == "POST" and r.url.endswith("/create_flow_run")
                    ) as created:
                        page.get_by_role("button", name="Submit", exact=True).click()
                    if created.value.status != 503:
                        break
                    # 503: the server's SQLite database was busy ("retryable": Prefect's Python client
                    # retries those). The UI says "Something went wrong" and keeps the form: submit again.
                    page.wait_for_timeout(5000)
                assert created.value.ok, f"HTTP {created.value.status}: {created.value.text()}"
                run_id = str(created.value.json()["id"])
                # The UI shows its "scheduled to start now" toast twice, one over the other: click the top.
                toast = page.locator(".toast-flow-run-create", has_text=run_name).last
                toast.get_by_role("button", name="View run").click()
                page.wait_for_url(re.compile(rf"/runs/flow-run/{run_id}"))
                expect_text(page.locator(".page-heading").first, run_name)

            with steps.step(f"wait for the run to complete (up to {RUN_TIMEOUT_S} s)"):
                submitted = last_reload = time.monotonic()
                deadline = submitted + RUN_TIMEOUT_S
                state = _state(page)
                while state not in FINAL_STATES:
                    assert time.monotonic() < deadline, f"the run is still '{state}' after {RUN_TIMEOUT_S} s"
                    page.wait_for_timeout(2000)
                    if time.monotonic() - last_reload > 20:  # the page polls too; a reload is a backstop
                        page.reload()
                        last_reload = time.monotonic()
                    state = _state(page)
                steps.shot("run-finished")
                assert state == "Completed", f"the run ended '{state}'"
                run_seconds = time.monotonic() - submitted

            with steps.step("open the run's artifacts"):
                page.locator("li.p-tab", has_text="Artifacts").click()
                card = page.locator('a:has(.artifact-card__title:text-is("data-refresh-datasets"))')
                card.wait_for()
                page.locator('.artifact-card__title:text-is("data-refresh-summary")').wait_for()
                steps.shot("run-artifacts")

            with steps.step("read the dataset table artifact"):
                card.click()
                page.wait_for_url(re.compile(r"/artifacts/artifact/[0-9a-f-]{36}"))
                table = page.locator(".artifact-data-table table")
                table.locator("tbody tr").first.wait_for()
                page.get_by_text(run_name).first.wait_for()  # the artifact page names its flow run
                headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
                rows = [
                    dict(zip(headers, (c.strip() for c in row.locator("td").all_inner_texts()), strict=True))
                    for row in table.locator("tbody tr").all()
                ]
                steps.shot("artifact-table")
                assert headers == ["dataset", "kind", "version", "rows", "status"], headers
                assert {r["kind"] for r in rows} == DATA_KINDS and len(rows) == len(DATA_KINDS), rows
                assert all(r["status"] == "registered" for r in rows), rows  # a fresh workspace
                by_kind = {r["kind"]: r for r in rows}
                assert by_kind["prompts"]["rows"] == str(NUM_PROMPTS), by_kind["prompts"]
        finally:
            context.close()
            browser.close()

    with steps.step("bvpo sql: the table's datasets are in the catalog, with the form's num_prompts"):
        catalog = _bvpo_sql(
            workspace,
            "select name, kind, version, row_count, config from datasets "
            f"where flow_run_id = '{run_id}' order by name",
        )
        found = {(d["name"], d["kind"], d["version"], str(d["row_count"])) for d in catalog}
        shown = {(r["dataset"], r["kind"], r["version"], r["rows"]) for r in rows}
        # Rejects (dropped rows) and the sampler/trainer agreement have their own artifacts, not this table.
        data = {d for d in found if d[1] not in ("rejects", "logp_agreement")}
        assert shown == data, f"the UI's table {sorted(shown)} != registered by run {run_id}: {sorted(data)}"
        prompts_ds = next(d for d in catalog if d["kind"] == "prompts")
        config = json.loads(prompts_ds["config"])
        assert config["num_prompts"] == NUM_PROMPTS, config
        (count,) = _bvpo_sql(workspace, f"select count(*) as n from {prompts_ds['name']}")
        assert count["n"] == NUM_PROMPTS, count
    print(
        f"UI workflow done in {time.monotonic() - started:.0f} s (the run: {run_seconds:.0f} s); {ARTIFACTS}"
    )


def expect_text(locator: Any, text: str) -> None:
    """Wait until ``locator`` contains ``text``."""
    from playwright.sync_api import expect

    expect(locator).to_contain_text(text, timeout=STEP_TIMEOUT_MS)


def _form_field(page: Any, label: str, control: str) -> Any:
    """The control of the schema-form property labelled ``label`` (exactly that property, not a parent)."""
    return page.locator(
        "div.schema-form-property:has(> div.p-label__header "
        f'span.schema-form-property__label:text-is("{label} (Optional)")) {control}'
    ).first


def _log_browser_errors(page: Any, path: Path) -> None:
    """Write the page's errors and failed API calls to ``path``, each distinct line once (for diagnosis)."""
    path.write_text("")
    seen: set[str] = set()

    def write(line: str) -> None:
        if line not in seen:
            seen.add(line)
            with path.open("a") as out:
                out.write(line + "\n")

    page.on("console", lambda m: m.type == "error" and write(f"console: {m.text}"))
    page.on("pageerror", lambda e: write(f"page error: {e}"))
    page.on(  # requests aborted by a reload or a navigation are expected
        "requestfailed",
        lambda r: (
            "ERR_ABORTED" not in (r.failure or "")
            and write(f"request failed: {r.method} {r.url}: {r.failure}")
        ),
    )
    page.on("response", lambda r: r.status >= 400 and write(f"HTTP {r.status} {r.request.method} {r.url}"))
