"""The cluster page at `/`, driven in a real headless chromium against the real daemon.

The nodes are brought online over the daemon's HTTP API and kept alive by heartbeats sent from a thread;
the browser sees only what the daemon answers.
"""

from __future__ import annotations

import datetime
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from selenium.webdriver.common.by import By
from support import REPO_ROOT, TEST_TOKEN, Daemon, http, sample_registration, wait_until
from support_browser import console_errors, headless_chromium, shown, texts
from support_daemon import beat, online_node
from support_tls import make_tls_daemon, write_ca, write_server_certificate

# The contract is stdlib only: the test reads the very file the daemon imports as its contract.py.
sys.path.insert(0, str(REPO_ROOT / "plugins" / "module_utils"))
from llorch_contract import CERTIFICATE_WARN_DAYS

MODEL = "tiny-model"
NODE_TIMEOUT_MS = 1500  # short, so a silent node shows offline within a few seconds
STORAGE_KEY = "llorch.read-credential"
UI = REPO_ROOT / "files" / "orchestratord" / "orchestratord" / "ui"
# What a hostile or broken agent may register as its address: it must reach the page as text.
HOSTILE_ADDRESS = '<img src=x onerror="window.pwned=1">'


class Heartbeats:
    """Keeps nodes online by beating for each every 200 ms until told to stop, one node at a time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.stops: dict[str, threading.Event] = {}
        self.threads: list[threading.Thread] = []
        self.failures: list[str] = []

    def keep(self, registration: dict, **beat_args) -> None:
        stop = self.stops[registration["node_id"]] = threading.Event()

        def run() -> None:
            while not stop.wait(0.2):
                try:
                    beat(self.daemon, registration, **beat_args)
                except (AssertionError, OSError) as exc:  # the daemon stopped at the end of a test
                    self.failures.append(f"{registration['node_id']}: {exc}")
                    return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self, node_id: str) -> None:
        self.stops[node_id].set()

    def stop_all(self) -> None:
        for stop in self.stops.values():
            stop.set()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def cluster(daemon_factory) -> Iterator[tuple[Daemon, Heartbeats]]:
    """gpu-1 serves MODEL from two pools; gpu-2 stages it with no engine; gpu-3 registered a hostile
    address. All kept online until a test stops one."""
    daemon = daemon_factory(node_timeout_ms=NODE_TIMEOUT_MS, heartbeat_interval_ms=200)
    heartbeats = Heartbeats(daemon)
    heartbeats.keep(online_node(daemon, "gpu-1", [MODEL], pools=2, serve=MODEL), models=[MODEL], serve=MODEL)
    heartbeats.keep(online_node(daemon, "gpu-2", [MODEL]), models=[MODEL])
    hostile = sample_registration("gpu-3")
    hostile["address"] = HOSTILE_ADDRESS
    assert daemon.api("POST", "/v2/nodes/register", hostile).status == 200
    beat(daemon, hostile)
    heartbeats.keep(hostile)
    yield daemon, heartbeats
    heartbeats.stop_all()


@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "chromium") as driver:
        yield driver


def sign_in(driver, daemon: Daemon, credential: str) -> None:
    driver.get(daemon.url + "/")
    wait_until(lambda: shown(driver, "login"), timeout=15, what="the page to ask for a credential")
    assert not shown(driver, "cluster")
    driver.find_element(By.ID, "credential").send_keys(credential)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()


def node_status(driver, node_id: str) -> str | None:
    cells = texts(driver, f'#nodes tr[data-node-id="{node_id}"] td.status')
    return cells[0] if cells else None


def test_page_asks_for_the_token_shows_the_cluster_and_a_node_going_offline(cluster, browser):
    daemon, heartbeats = cluster
    sign_in(browser, daemon, TEST_TOKEN)

    wait_until(
        lambda: {node_status(browser, n) for n in ("gpu-1", "gpu-2", "gpu-3")} == {"online"},
        timeout=15,
        what="three online nodes on the page",
    )
    assert texts(browser, '#nodes tr[data-node-id="gpu-1"] td')[:4] == [
        "gpu-1",
        "http://gpu-1.lab:8080",
        "online",
        "no",
    ]
    # Free text from a node is shown as text: no element made of it, no script run.
    assert texts(browser, '#nodes tr[data-node-id="gpu-3"] td')[1] == HOSTILE_ADDRESS
    assert browser.find_elements(By.CSS_SELECTOR, "#nodes img") == []
    assert browser.execute_script("return window.pwned === undefined")

    pool = texts(browser, '#pools tr[data-pool="gpu-1/pool-1"] td')
    assert pool == ["gpu-1 / pool-1", "llama.cpp", "ready", MODEL, "yes", "0 / 4", "10.0 GiB / 80.0 GiB"]
    assert texts(browser, '#pools tr[data-pool="gpu-2/pool-0"] td')[1:4] == ["none", "\u2014", "\u2014"]
    model = texts(browser, f'#models tr[data-model="{MODEL}"] td')
    assert model == [MODEL, "gpu-1/pool-0, gpu-1/pool-1", "gpu-1, gpu-2", "2", "8"]
    assert (
        shown(browser, "errors-empty")
        and browser.find_element(By.ID, "errors-empty").text == "None recorded."
    )
    assert browser.find_element(By.ID, "freshness").text.startswith("updated ")
    # Plain HTTP (the lab switch): no certificate to count days on, and the page says why.
    assert shown(browser, "certificates-empty") and not shown(browser, "certificates")
    assert (
        browser.find_element(By.ID, "certificates-empty").text
        == "No certificate: this daemon serves plain HTTP."
    )

    # A placement the daemon refuses shows among the recent errors at the next refresh.
    refused = daemon.api("POST", "/v2/placement", {"model_id": "no-such-model"})
    assert refused.status == 503, refused.text
    wait_until(
        lambda: "MODEL_NOT_AVAILABLE" in " ".join(texts(browser, "#errors td")),
        timeout=15,
        what="the refused placement among the recent errors",
    )
    assert "no-such-model" in " ".join(texts(browser, "#errors td"))
    assert not shown(browser, "errors-empty")

    # The credential: in this tab's sessionStorage only; not in the URL, localStorage or a cookie.
    assert TEST_TOKEN not in browser.current_url
    assert browser.execute_script(f"return sessionStorage.getItem('{STORAGE_KEY}')") == TEST_TOKEN
    assert browser.execute_script("return localStorage.length") == 0
    assert browser.execute_script("return document.cookie") == ""
    assert browser.find_element(By.ID, "credential").get_attribute("value") == ""

    heartbeats.stop("gpu-2")
    wait_until(
        lambda: node_status(browser, "gpu-2") == "offline", timeout=20, what="gpu-2 offline on the page"
    )
    assert node_status(browser, "gpu-1") == "online"
    assert 'class="stale"' in browser.find_element(
        By.CSS_SELECTOR, '#pools tr[data-pool="gpu-2/pool-0"]'
    ).get_attribute("outerHTML")

    # A reload in the same tab keeps the credential: no second prompt.
    browser.refresh()
    wait_until(lambda: node_status(browser, "gpu-1") == "online", timeout=15, what="the page after a reload")
    assert not shown(browser, "login")
    assert console_errors(browser) == []

    # The daemon going away is said, and the last tables stay.
    heartbeats.stop_all()
    daemon.stop()
    wait_until(
        lambda: browser.find_element(By.ID, "freshness").get_attribute("data-state") == "unreachable",
        timeout=20,
        what="the page to say the daemon is unreachable",
    )
    assert "daemon unreachable" in browser.find_element(By.ID, "freshness").text
    assert node_status(browser, "gpu-1") == "online"


def test_a_refused_credential_is_forgotten_and_asked_for_again(cluster, browser):
    daemon, _heartbeats = cluster
    sign_in(browser, daemon, "not-the-token-" + "y" * 30)
    wait_until(lambda: shown(browser, "login-problem"), timeout=15, what="the page to refuse the credential")
    assert "401" in browser.find_element(By.ID, "login-problem").text
    assert not shown(browser, "cluster")
    assert browser.execute_script(f"return sessionStorage.getItem('{STORAGE_KEY}')") is None
    assert texts(browser, "#nodes tbody tr") == []
    # The browser logs the refused requests; nothing else may go wrong (no script error).
    assert [
        e for e in console_errors(browser) if e["source"] != "network" or " 401 " not in e["message"]
    ] == []

    browser.find_element(By.ID, "credential").send_keys(TEST_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait_until(
        lambda: node_status(browser, "gpu-1") == "online", timeout=15, what="the cluster after the retry"
    )
    assert not shown(browser, "login-problem")

    # "Forget credential" drops it and what was read with it.
    browser.find_element(By.ID, "forget").click()
    assert shown(browser, "login")
    assert browser.execute_script(f"return sessionStorage.getItem('{STORAGE_KEY}')") is None
    assert texts(browser, "#nodes tbody tr") == []


def test_page_and_its_files_need_no_token_and_allow_only_self(daemon):
    page = http("GET", daemon.url + "/")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-cache"
    # Every file the page loads is served, from this daemon only, and no script is inline.
    loaded = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert loaded and all(path.startswith("/ui/") for path in loaded), loaded
    assert "<script>" not in page.text and " style=" not in page.text
    for path in loaded:
        assert http("GET", daemon.url + path).status == 200, path
    assert http("GET", daemon.url + "/ui/page.js").headers["Content-Type"] == "text/javascript; charset=utf-8"


def test_a_browser_revalidates_and_gets_a_new_version_at_once(daemon):
    first = http("GET", daemon.url + "/ui/page.js")
    again = http("GET", daemon.url + "/ui/page.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304 and again.text == ""
    stale = http("GET", daemon.url + "/ui/page.js", headers={"If-None-Match": '"an-older-version"'})
    assert stale.status == 200 and stale.text == first.text


def test_unknown_ui_file_is_404_in_the_envelope(daemon):
    for path in ("/ui/nothing.js", "/ui/..%2fapp.py", "/ui/"):
        answer = http("GET", daemon.url + path)
        assert answer.status == 404, path
        assert answer.body["code"] == "NOT_FOUND", path


def test_the_script_never_parses_daemon_data_as_html_nor_keeps_the_credential_on_disk():
    script = (UI / "page.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert sink not in script, sink
    assert not re.search(r"\blocalStorage\s*[.\[]", script)
    assert re.search(r"\bsessionStorage\.setItem\(", script)


def test_the_wheel_carries_the_page(tmp_path):
    """The roles install the daemon from a wheel: the page's files must be in it."""
    source = tmp_path / "orchestratord"
    shutil.copytree(
        REPO_ROOT / "files" / "orchestratord", source, ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            str(source),
            "-w",
            str(tmp_path / "wheels"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheels").glob("orchestratord-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for file in UI.iterdir():
        assert f"orchestratord/ui/{file.name}" in names, file.name


# --- the days left on the certificates ----------------------------------------------------------------------


def certificate_row(driver, certificate: str) -> tuple[list[str], str]:
    """The row's cells and its class."""
    selector = f'#certificates tr[data-certificate="{certificate}"]'
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return (texts(driver, selector + " td"), found[0].get_attribute("class") if found else "")


def test_page_shows_days_left_on_the_certificates_and_warns_below_the_threshold(tmp_path, browser):
    """A reader credential is enough; a certificate with 0 days left warns, one renewed for 40 does not."""
    ca = write_ca(tmp_path / "ca.pem")
    daemon = make_tls_daemon(tmp_path / "orchestratord", ca=ca).start()
    try:
        issued = daemon.api("POST", "/v2/credentials", {"name": "page-reader", "scope": "reader"})
        assert issued.status == 201, issued.text
        reader = issued.body["secret"]
        # The data route is a reader route like every /v2 read: nothing without a credential.
        assert daemon.api("GET", "/v2/certificates", token=None).status == 401
        answer = daemon.api("GET", "/v2/certificates", token=reader)
        assert answer.status == 200, answer.text
        assert answer.body["warn_days"] == CERTIFICATE_WARN_DAYS
        assert [(c["certificate"], c["days_left"], c["warn"]) for c in answer.body["certificates"]] == [
            ("server", 0, True),
            ("ca", 0, True),
        ]

        # The test CA is not the browser's: tell this one browser to take the daemon's certificate.
        browser.execute_cdp_cmd("Security.setIgnoreCertificateErrors", {"ignore": True})
        sign_in(browser, daemon, reader)
        wait_until(
            lambda: certificate_row(browser, "server")[0] != [],
            timeout=15,
            what="the certificates on the page",
        )
        cells, style = certificate_row(browser, "server")
        server_not_after = answer.body["certificates"][0]["not_after"]
        assert cells == [
            "server certificate (this daemon)",
            f"0 (fewer than {CERTIFICATE_WARN_DAYS}: renew)",
            server_not_after,
        ]
        assert style == "warn"
        assert certificate_row(browser, "ca")[0][:2] == [
            "cluster CA",
            f"0 (fewer than {CERTIFICATE_WARN_DAYS}: renew)",
        ]
        colour = browser.find_element(By.CSS_SELECTOR, "#certificates td.days-warn").value_of_css_property(
            "color"
        )
        assert colour == "rgba(180, 35, 24, 1)"

        # Renewed for 40 days and reloaded (SIGHUP, as renew_certificates.yml does): no warning at the next
        # refresh; the CA still warns.
        later = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=40)
        write_server_certificate(
            ca, Path(daemon.config["tls_cert_file"]), Path(daemon.config["tls_key_file"]), not_after=later
        )
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: certificate_row(browser, "server")[1] == "",
            timeout=20,
            what="the renewed certificate on the page without a warning",
        )
        assert certificate_row(browser, "server")[0][1:] == ["39", later.strftime("%Y-%m-%dT%H:%M:%SZ")]
        assert certificate_row(browser, "ca")[1] == "warn"
        assert console_errors(browser) == []
    finally:
        daemon.stop()


def test_every_warning_threshold_is_the_contracts():
    """One threshold: the page's (the daemon's warn_days), status.yml's and llorch_pki's default."""
    pki_defaults = yaml.safe_load((REPO_ROOT / "roles" / "llorch_pki" / "defaults" / "main.yml").read_text())
    assert pki_defaults["llorch_pki_warn_days"] == CERTIFICATE_WARN_DAYS
    status = (REPO_ROOT / "playbooks" / "status.yml").read_text()
    assert f"llorch_pki_warn_days | default({CERTIFICATE_WARN_DAYS})" in status
