"""Write the README's picture of the cluster page: a real daemon on loopback with a few nodes in the states
an operator meets (serving, busy, loading, drained, offline), shown in headless chromium.

Run from the repo root with the dev venv: `.venv/bin/python scripts/page-screenshot.py [out.png]`
(default docs/img/cluster-page.png). Uses the tests' helpers, so the daemon and the browser are set up
exactly as `tests/test_cluster_page.py` sets them up.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from selenium.webdriver.common.by import By  # noqa: E402
from support import make_daemon, sample_registration, wait_until  # noqa: E402
from support_browser import headless_chromium  # noqa: E402
from support_daemon import GiB, beat_pools, pool_reading, serving, status_of  # noqa: E402

OUT = REPO_ROOT / "docs" / "img" / "cluster-page.png"
MAX_BYTES = 150 * 1024
CHAT = "qwen2.5-0.5b-instruct-q4_k_m"
CODE = "qwen2.5-coder-1.5b-q4_k_m"


def readings() -> dict[str, list[dict]]:
    """Each live node's pools, as its agent would report them."""
    return {
        "gpu-a1": [
            pool_reading(
                "pool-0",
                [CHAT],
                engine=serving("gpu-a1", "pool-0", CHAT, "busy"),
                slots_free=1,
                vram_free_bytes=22 * GiB,
            ),
            pool_reading(
                "pool-1",
                [CHAT],
                engine=serving("gpu-a1", "pool-1", CHAT),
                slots_free=3,
                vram_free_bytes=61 * GiB,
            ),
        ],
        "gpu-a2": [
            pool_reading(
                "pool-0",
                [CHAT, CODE],
                engine=serving("gpu-a2", "pool-0", CODE),
                slots_free=4,
                vram_free_bytes=64 * GiB,
            ),
            pool_reading(
                "pool-1", [CHAT, CODE], engine=serving("gpu-a2", "pool-1", CHAT, "loading"), ready=False
            ),
        ],
        "gpu-b1": [pool_reading("pool-0", [CODE], engine=serving("gpu-b1", "pool-0", CODE), draining=True)],
    }


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    workdir = Path(tempfile.mkdtemp(prefix="llorch-page-"))
    daemon = make_daemon(workdir / "daemon", node_timeout_ms=3000, heartbeat_interval_ms=500).start()
    stop = threading.Event()
    try:
        # The offline node registers first and never beats: it goes offline while the others keep beating.
        for node_id in ("gpu-c1", *readings()):
            registration = sample_registration(node_id, pools=2 if node_id.startswith("gpu-a") else 1)
            assert daemon.api("POST", "/v2/nodes/register", registration).status == 200

        def keep_beating() -> None:
            while not stop.is_set():
                for node_id, pools in readings().items():
                    beat_pools(daemon, node_id, pools)
                stop.wait(0.5)

        threading.Thread(target=keep_beating, daemon=True).start()
        assert daemon.api("POST", "/v2/nodes/gpu-b1/drain", {"drain": True}).status == 200
        wait_until(lambda: status_of(daemon, "gpu-c1") == "offline", timeout=15, what="gpu-c1 offline")
        for model_id in ("llama-3.1-70b-instruct", CODE):  # refusals for the errors table, where it exists
            daemon.api("POST", "/v2/placement", {"model_id": model_id, "vram_bytes": 70 * GiB})

        with headless_chromium(workdir / "chromium") as browser:
            browser.get(daemon.url + "/")
            browser.find_element(By.ID, "credential").send_keys(daemon.token)
            browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
            wait_until(
                lambda: len(browser.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")) == 4,
                timeout=15,
                what="the four nodes on the page",
            )
            # The whole page in one picture: a viewport as tall as the document, at one pixel per CSS pixel.
            height = browser.execute_script(
                "return Math.ceil(document.body.getBoundingClientRect().bottom) + 16"
            )
            metrics = {"width": 1200, "height": height, "deviceScaleFactor": 1, "mobile": False}
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(browser.get_screenshot_as_png())
    finally:
        stop.set()
        daemon.stop()
    size = out.stat().st_size
    print(f"wrote {out} ({size // 1024} KiB)")
    if size > MAX_BYTES:
        print(f"too large for the README: {size} bytes > {MAX_BYTES}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
