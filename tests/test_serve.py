"""Every route of `bertforge serve` through FastAPI's test client (in-process, tiny models): answers,
equality with `bertforge embed` (float and base64), error paths (4xx with one-line messages), limits,
auth, metrics, dynamic batching across concurrent requests and a fuzz run that leaves the server healthy."""

from __future__ import annotations

import asyncio
import base64
import json
import random

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_serve_support import TEXTS

from bertforge.serve.app import create_app
from bertforge.serve.core import ServeSettings


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models, ServeSettings(max_texts=64, max_chars=5000))) as c:
        yield c


def post(client, path, body, status=200, **kw):
    r = client.post(path, json=body, **kw)
    assert r.status_code == status, r.text
    return r.json()


def error(client, path, body, status):
    out = post(client, path, body, status)
    assert set(out["error"]) == {"message", "type", "code"} and out["error"]["code"] == status
    assert "\n" not in out["error"]["message"]
    return out["error"]["message"]


def decode(item, fmt):
    return np.frombuffer(base64.b64decode(item), dtype="<f4") if fmt == "base64" else np.asarray(item, np.float32)


def test_embeddings_equal_bertforge_embed_float_and_base64(client, paths, tmp_path):
    from bertforge.inference import embed

    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    embed(paths["st"], src, tmp_path / "out.npy")
    expected = np.load(tmp_path / "out.npy")
    for fmt in ("float", "base64"):
        out = post(client, "/v1/embeddings", {"model": "st", "input": TEXTS, "encoding_format": fmt})
        assert out["object"] == "list" and out["model"] == "st" and out["truncated"] == 1
        assert [d["index"] for d in out["data"]] == [0, 1, 2, 3] and out["data"][0]["object"] == "embedding"
        got = np.stack([decode(d["embedding"], fmt) for d in out["data"]])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > len(TEXTS) * 3
    one = post(client, "/v1/embeddings", {"model": "st", "input": TEXTS[0]})
    np.testing.assert_allclose(one["data"][0]["embedding"], expected[0], atol=1e-5)
    cut = post(client, "/v1/embeddings", {"model": "st", "input": TEXTS, "dimensions": 8})
    short = np.asarray([d["embedding"] for d in cut["data"]])
    np.testing.assert_allclose(short, expected[:, :8] / np.linalg.norm(expected[:, :8], axis=1, keepdims=True),
                               atol=1e-5)


def test_embeddings_token_ids_and_limits(client, models):
    st = models["st"]
    [tok] = st.tokenize(TEXTS[0])
    by_ids = post(client, "/v1/embeddings", {"model": "st", "input": [tok["ids"]]})
    by_text = post(client, "/v1/embeddings", {"model": "st", "input": TEXTS[0]})
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6)
    assert post(client, "/v1/embeddings", {"model": "st", "input": tok["ids"]})["usage"]["total_tokens"] == len(tok["ids"])
    assert "outside the vocabulary" in error(client, "/v1/embeddings", {"model": "st", "input": [[2, 99999, 3]]}, 422)
    assert "longer than the model's 48 tokens" in error(client, "/v1/embeddings",
                                                         {"model": "st", "input": TEXTS, "truncate": False}, 422)
    assert "65 input in one request; the limit is 64" in error(client, "/v1/embeddings", {"input": ["a"] * 65}, 413)
    assert "the limit is 5,000" in error(client, "/v1/embeddings", {"input": ["a" * 5001]}, 413)
    assert "input is empty" in error(client, "/v1/embeddings", {"input": []}, 422)
    assert "input[1] is empty" in error(client, "/v1/embeddings", {"input": ["ok", ""]}, 422)
    assert "dimensions 99" in error(client, "/v1/embeddings", {"model": "st", "input": "a", "dimensions": 99}, 422)
    assert "not served here: use one of mlm, cls, reg, qa, st" in error(client, "/v1/embeddings",
                                                                        {"model": "nope", "input": "a"}, 404)
    assert "encoding_format" in error(client, "/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 422)


def test_similarity_ranks_by_cosine(client, models):
    sentences = TEXTS[1:]
    out = post(client, "/similarity", {"model": "st", "source_sentence": TEXTS[0], "sentences": sentences})
    emb = models["st"].encode([TEXTS[0], *sentences])
    np.testing.assert_allclose(out["scores"], emb[1:] @ emb[0], atol=1e-5)
    assert [r["index"] for r in out["ranking"]] == list(np.argsort(-(emb[1:] @ emb[0])))
    assert "sentences is empty" in error(client, "/similarity", {"source_sentence": "a", "sentences": []}, 422)


def test_fill_mask_route(client, models):
    out = post(client, "/fill-mask", {"model": "mlm", "inputs": ["the [MASK] sat on the [MASK] .", "a [MASK]"],
                                      "top_k": 3})
    expected = models["mlm"].fill_mask("the [MASK] sat on the [MASK] .", top_k=3)
    assert len(out["predictions"]) == 2 and len(out["predictions"][0]) == 2 and len(out["predictions"][1]) == 1
    assert [p["token"] for p in out["predictions"][0][1]] == [p["token"] for p in expected[1]]
    np.testing.assert_allclose([p["score"] for p in out["predictions"][0][0]], [p["score"] for p in expected[0]],
                               atol=1e-6)
    assert "has no [MASK] token" in error(client, "/fill-mask", {"model": "mlm", "inputs": "no mask"}, 422)
    msg = error(client, "/fill-mask", {"model": "st", "inputs": "a [MASK]"}, 400)
    assert "model 'st' has head 'base'" in msg and "masked-LM head" in msg


def test_classify_rerank_qa_inspect_tokenize(client, models):
    out = post(client, "/classify", {"model": "cls", "inputs": [["A man.", "A guitar."], ["The cat.", "A mat."]]})
    expected = models["cls"].classify([("A man.", "A guitar."), ("The cat.", "A mat.")])
    assert [r["label"] for r in out["results"]] == [r["label"] for r in expected]
    reg = post(client, "/classify", {"model": "reg", "inputs": "The cat sat."})
    assert reg["results"][0]["label"] is None and reg["results"][0]["score"] == pytest.approx(
        models["reg"].classify(["The cat sat."])[0]["score"], abs=1e-6)
    assert "has head 'base'" in error(client, "/classify", {"model": "st", "inputs": "a"}, 400)
    assert "either texts or" in error(client, "/classify", {"model": "cls", "inputs": [["a", "b", "c"]]}, 422)
    ranked = post(client, "/rerank", {"model": "reg", "query": "a cat", "texts": TEXTS, "return_text": True})
    assert sorted(r["index"] for r in ranked["results"]) == [0, 1, 2, 3]
    assert all(0 < r["score"] < 1 and r["text"] == TEXTS[r["index"]] for r in ranked["results"])
    assert "3-label classifier" in error(client, "/rerank", {"model": "cls", "query": "a", "texts": ["b"]}, 400)
    context = " ".join(["The baker carried fresh bread across the old stone bridge."] * 6)
    answer = post(client, "/qa", {"model": "qa", "question": "Who carried the bread?", "context": context})
    assert answer["windows"] > 1 and answer == {"model": "qa", "windows": answer["windows"],
                                                **models["qa"].answer("Who carried the bread?", context)}
    assert "has head 'masked_lm', but answer needs" in error(client, "/qa", {"model": "mlm", "question": "q",
                                                                             "context": "c"}, 400)
    ins = post(client, "/inspect", {"model": "mlm", "text": context[:180], "mask_rate": 0.3})
    assert "68 tokens > max_length=64" in error(client, "/inspect", {"model": "mlm", "text": context}, 422)
    assert any(r["masked"] and r["predicted"] for r in ins["records"])
    assert "selects no token" in error(client, "/inspect", {"model": "mlm", "text": "a", "mask_rate": 0.01}, 422)
    tok = post(client, "/tokenize", {"model": "st", "inputs": "The cat sat.", "pairs": ["On a mat."]})
    assert tok["tokens"][0]["tokens"][0] == "[CLS]" and 1 in tok["tokens"][0]["token_type_ids"]


def test_info_health_page_docs(client):
    info = client.get("/info").json()
    assert [m["name"] for m in info["models"]] == ["mlm", "cls", "reg", "qa", "st"]
    st = next(m for m in info["models"] if m["name"] == "st")
    assert st["dim"] == 32 and st["max_length"] == 48 and st["head"] == "base" and info["limits"]["max_texts"] == 64
    assert client.get("/health").json() == {"status": "ok", "models": ["mlm", "cls", "reg", "qa", "st"]}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["mlm", "cls", "reg", "qa", "st"]
    page = client.get("/")
    assert page.status_code == 200 and "bertforge serve" in page.text and "<script" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    schema = client.get("/openapi.json").json()
    assert {"/v1/embeddings", "/similarity", "/fill-mask", "/classify", "/qa", "/tokenize"} <= set(schema["paths"])


def test_metrics_count_requests_by_route_and_status(client):
    post(client, "/v1/embeddings", {"input": "a"})
    error(client, "/v1/embeddings", {"input": []}, 422)
    text = client.get("/metrics").text
    assert 'bertforge_requests_total{method="POST",route="/v1/embeddings",status="200"}' in text
    assert 'bertforge_requests_total{method="POST",route="/v1/embeddings",status="422"}' in text
    assert 'bertforge_request_duration_seconds_bucket{le="0.002",method="POST",route="/v1/embeddings"' in text
    for family in ("bertforge_queue_rows", "bertforge_batch_rows_bucket", "bertforge_batch_tokens_bucket",
                   "bertforge_tokens_total", "bertforge_batch_requests_bucket"):
        assert family in text
    client.get("/no/such/path")
    assert 'route="other",status="404"' in client.get("/metrics").text


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in metrics")


def test_concurrent_requests_share_batches_and_get_their_own_rows(models):
    app = create_app({"st": models["st"]}, ServeSettings(max_wait_ms=200))
    texts = [[f"request {i} sentence {j} about the cat and the bridge" for j in range(i % 3 + 1)] for i in range(12)]

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                replies = await asyncio.gather(*(c.post("/v1/embeddings", json={"input": t}) for t in texts))
                return replies, (await c.get("/metrics")).text

    replies, text = asyncio.run(main())
    for t, r in zip(texts, replies):
        assert r.status_code == 200
        got = np.asarray([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, models["st"].encode(t), atol=1e-5)
    batches = metric(text, "bertforge_batch_requests_count", kind="embed", model="st")
    requests = metric(text, "bertforge_batch_requests_sum", kind="embed", model="st")
    single = metric(text, "bertforge_batch_requests_bucket", kind="embed", le="1.0", model="st")
    assert requests == 12 + 1  # the 12 requests and the warm-up
    assert single < batches and batches <= 3  # the 12 concurrent requests shared a batch


def test_full_queue_answers_503_with_retry_after(models):
    app = create_app({"st": models["st"]}, ServeSettings(max_wait_ms=300, max_queue_tokens=20))

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                first = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": TEXTS[:2]}))
                await asyncio.sleep(0.05)
                second = await c.post("/v1/embeddings", json={"input": TEXTS[:2]})
                return await first, second, (await c.get("/metrics")).text

    first, second, text = asyncio.run(main())
    assert first.status_code == 200 and second.status_code == 503
    assert int(second.headers["retry-after"]) >= 1 and "queue is full" in second.json()["error"]["message"]
    assert metric(text, "bertforge_rejected_total", model="st") == 1


def test_auth_on_and_off(models):
    with TestClient(create_app({"st": models["st"]}, ServeSettings(api_key="s3cret"))) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/embeddings", json={"input": "a"}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/info").status_code == 401 and c.get("/metrics").status_code == 401
        ok = c.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and c.get("/info", headers={"Authorization": "Bearer s3cret"}).json()["auth"]


def test_cors_only_when_asked(models):
    with TestClient(create_app({"st": models["st"]}, ServeSettings())) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "https://x.test"}).headers
    with TestClient(create_app({"st": models["st"]}, ServeSettings(cors_origins=["https://x.test"]))) as c:
        r = c.options("/v1/embeddings", headers={"Origin": "https://x.test", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://x.test"


def test_body_limit_and_content_type(models):
    with TestClient(create_app({"st": models["st"]}, ServeSettings(max_body_bytes=1000))) as c:
        r = c.post("/v1/embeddings", json={"input": ["a" * 600, "b" * 600]})
        assert r.status_code == 413 and "over 1,000 bytes" in r.json()["error"]["message"]
        chunked = c.post("/v1/embeddings", content=iter([b'{"input": "', b"a" * 2000, b'"}']),
                         headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413
        assert c.post("/v1/embeddings", content=b"input=a", headers={"Content-Type": "text/plain"}).status_code == 415


def fuzz_bodies(rng: random.Random) -> list:
    weird = ["\x00", "\x00" * 50, "🙂" * 300, "\ud7ff", "[MASK]", "<script>alert(1)</script>", " ", "\n\t", "é" * 4000]
    bodies: list = [b"", b"{", b"[]", b"null", b"1", b'"text"', b"{\"input\": }", b"\xff\xfe\x00", b'{"input": "\\ud800"}',
                    json.dumps({"input": ["a"] * 10_000}).encode(), json.dumps({"input": [[]]}).encode()]
    values = [None, 1, -1, 1e308, True, "", "x", [], [None], [1.5], [[1, "a"]], {"a": 1}, ["ok", 3], [[-1]], [[2**40]]]
    fields = ["input", "model", "encoding_format", "dimensions", "truncate", "inputs", "top_k", "sentences",
              "source_sentence", "question", "context", "text", "mask_rate", "pairs", "query", "texts"]
    for _ in range(150):
        body = {f: rng.choice(values + weird) for f in rng.sample(fields, rng.randint(0, 4))}
        bodies.append(json.dumps(body).encode())
    return bodies


def test_fuzz_only_4xx_and_still_healthy(client):
    rng = random.Random(0)
    routes = ["/v1/embeddings", "/similarity", "/rerank", "/fill-mask", "/classify", "/qa", "/inspect", "/tokenize"]
    statuses = set()
    for i, body in enumerate(fuzz_bodies(rng)):
        route = routes[i % len(routes)]
        ctype = rng.choice(["application/json"] * 4 + ["text/plain", "application/x-www-form-urlencoded"])
        r = client.post(route, content=body, headers={"Content-Type": ctype})
        statuses.add(r.status_code)
        assert r.status_code < 500, (route, body[:200], r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
    assert statuses - {200} and statuses <= {200, 400, 404, 413, 415, 422}
    for text in ["\x00 nul inside", "🙂 unicode ok", "é" * 10]:
        assert post(client, "/v1/embeddings", {"model": "st", "input": text})["data"]
    assert client.get("/health").json()["status"] == "ok"
    assert post(client, "/v1/embeddings", {"model": "st", "input": TEXTS})["data"][3]["index"] == 3


def test_one_request_split_over_batches_keeps_its_order(models):
    app = create_app({"st": models["st"]}, ServeSettings(max_batch_tokens=40, max_wait_ms=1))
    texts = [f"sentence number {i} about the cat on the mat" for i in range(20)]
    with TestClient(app) as c:
        out = post(c, "/v1/embeddings", {"input": texts})
        text = c.get("/metrics").text
    got = np.asarray([d["embedding"] for d in out["data"]])
    np.testing.assert_allclose(got, models["st"].encode(texts), atol=1e-5)
    assert metric(text, "bertforge_batch_requests_count", kind="embed", model="st") >= 1 + 20 * 12 // 40


def test_cli_serve_errors(paths, monkeypatch, capsys):
    from bertforge.cli import main

    assert main(["serve", f"a={paths['st']}", f"a={paths['mlm']}"]) == 2
    assert "two models are named 'a'" in capsys.readouterr().err
    assert main(["serve", str(paths["st"]), "--max-texts", "0"]) == 2
    assert "--max-texts 0 is out of range" in capsys.readouterr().err
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(paths["st"]), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as if the serve extra were missing
    assert main(["serve", str(paths["st"])]) == 2
    assert 'pip install "bertforge[serve]"' in capsys.readouterr().err


def test_a_failing_model_answers_500_and_the_worker_survives(models):
    app = create_app({"st": models["st"]})
    with TestClient(app, raise_server_exceptions=False) as c:
        runners = app.state.server.served["st"].batcher.runners
        working, runners["embed"] = runners["embed"], lambda rows: 1 / 0
        r = c.post("/v1/embeddings", json={"input": "a"})
        assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]["message"]
        runners["embed"] = working
        assert post(c, "/v1/embeddings", {"input": "a"})["data"] and c.get("/health").status_code == 200
