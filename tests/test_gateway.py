"""`gardenctl gateway` end to end: real stand-in workers started by `apply`, the gateway as a
child process, and the real `openai` client (plus plain HTTP) against it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import openai
import pytest
from e2e_helpers import garden_at, model, wait_until
from gateway_helpers import Gateway, write_garden

pytestmark = pytest.mark.e2e

GATEWAY_KEY = "gw-test-key-1"
WORKER_KEY = "worker-test-key-2"
KEYS = {"GW_KEY": GATEWAY_KEY, "WORKER_KEY": WORKER_KEY}
SLOW = {"STANDIN_VLLM_REQUEST_DELAY": "0.5"}  # a request stays outstanding for a while
MODELS = [model("alpha"), model("beta", replicas=2, env=SLOW),
          model("secured", env={"VLLM_API_KEY": "${WORKER_KEY}"})]
# 200 connections at once overflow a listen queue of socketserver's default 5: the kernel drops
# handshakes and a stream can wait many seconds for a retransmission (vLLM's uvicorn: 2048)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One garden of three models (beta with two slow replicas, secured with its own worker
    key) behind a gateway that wants GW_KEY, listening on the port its garden file says."""
    with garden_at(tmp_path_factory.mktemp("served"), extra_env=KEYS) as garden:
        from e2e_helpers import free_port

        port = free_port()
        write_garden(garden, MODELS, gateway={"port": port, "api_key": "${GW_KEY}"})
        run = garden.apply()
        assert run.code == 0, str(run)
        yield Gateway(garden, port=port)


@pytest.fixture
def garden(tmp_path):
    with garden_at(tmp_path / "garden") as created:
        yield created


def test_models_lists_every_ready_model(served):
    listed = served.client(GATEWAY_KEY).models.list()

    assert sorted(m.id for m in listed.data) == ["alpha", "beta", "secured"]
    assert {m.object for m in listed.data} == {"model"}


def test_chat_and_completions_answer_through_the_openai_client(served):
    client = served.client(GATEWAY_KEY)

    chat = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hello world"}], max_tokens=3)
    completion = client.completions.create(model="alpha", prompt="one two", max_tokens=4)

    assert chat.choices[0].message.content == "hello world hello"
    assert chat.model == "alpha"
    assert completion.choices[0].text == " one two one two"


def test_a_worker_gets_its_own_key_never_the_clients(served):
    reply = served.client(GATEWAY_KEY).completions.create(model="secured", prompt="x",
                                                          max_tokens=1)

    assert reply.choices[0].text == " x"  # the worker wants WORKER_KEY; the client sent GW_KEY


def test_unknown_model_is_a_404_model_not_found(served):
    with pytest.raises(openai.NotFoundError) as caught:
        served.client(GATEWAY_KEY).chat.completions.create(
            model="gamma", messages=[{"role": "user", "content": "hi"}])

    error = caught.value.body
    assert caught.value.status_code == 404
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert "gamma" in error["message"]


def test_a_wrong_or_missing_key_is_a_401(served):
    with pytest.raises(openai.AuthenticationError) as caught:
        served.client("wrong-key").models.list()
    status, _, body = served.request("POST", "/v1/completions", {"model": "alpha", "prompt": "x"})

    assert caught.value.status_code == 401
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_requests_go_to_the_least_busy_replica_ties_to_the_lowest_id(served):
    garden = served.garden
    first, second = garden.worker_id("beta", 0), garden.worker_id("beta", 1)
    client = served.client(GATEWAY_KEY).with_raw_response
    alone = [client.completions.create(model="beta", prompt="p", max_tokens=1)
             for _ in range(2)]
    answered: list[str] = []
    worker = threading.Thread(target=lambda: answered.append(client.completions.create(
        model="beta", prompt="p", max_tokens=1).headers["x-gardenctl-worker"]))
    worker.start()
    busy = wait_until(lambda: served.metric("gardenctl_gateway_requests_in_flight",
                                            model="beta") == 1)
    beside = client.completions.create(model="beta", prompt="p", max_tokens=1)
    worker.join(timeout=30)

    assert [r.headers["x-gardenctl-worker"] for r in alone] == [first, first]
    assert busy
    assert beside.headers["x-gardenctl-worker"] == second
    assert answered == [first]


def test_worker_errors_pass_through_with_their_status(served):
    with pytest.raises(openai.BadRequestError) as caught:
        served.client(GATEWAY_KEY).completions.create(model="alpha", prompt="x", max_tokens=-1)
    status, headers, body = served.request(
        "POST", "/v1/embeddings", {"model": "alpha", "input": "x"},
        {"Authorization": f"Bearer {GATEWAY_KEY}"})

    assert "max_tokens" in caught.value.body["message"]  # the stand-in's own words
    assert status == 404 and json.loads(body) == {"detail": "Not Found"}  # it has no embeddings
    assert headers["x-gardenctl-worker"] == served.garden.worker_id("alpha")


def test_metrics_count_requests_errors_and_latency_per_model(served):
    client = served.client(GATEWAY_KEY)
    before = served.metric("gardenctl_gateway_requests_total", model="alpha", code="200")
    for _ in range(3):
        client.completions.create(model="alpha", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    status, headers, text = served.request("GET", "/metrics")

    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert served.metric("gardenctl_gateway_requests_total", model="alpha", code="200") \
        == before + 3
    assert served.metric("gardenctl_gateway_errors_total", model="_unknown",
                         kind="model_not_found") >= 1
    assert served.metric("gardenctl_gateway_requests_in_flight", model="alpha") == 0
    assert served.metric("gardenctl_gateway_request_duration_seconds_count", model="alpha") \
        >= before + 3
    assert served.metric("gardenctl_gateway_ready_replicas", model="beta") == 2
    assert 'gardenctl_gateway_wakeups_total{model="alpha"} 0' in text.decode()
    assert 'gardenctl_gateway_wake_seconds_count{model="alpha"} 0' in text.decode()


def test_plain_http_health_and_unknown_routes(served):
    status, _, body = served.request("GET", "/health")
    missing, _, error = served.request("GET", "/nowhere")
    wrong_method, _, _ = served.request("GET", "/v1/chat/completions")

    assert status == 200 and json.loads(body)["status"] == "ok"
    assert missing == 404
    assert json.loads(error)["error"] == {"message": "Invalid URL (GET /nowhere)",
                                          "type": "invalid_request_error", "param": None,
                                          "code": "unknown_url"}
    assert wrong_method == 404


def test_gateway_follows_apply_and_a_stopped_model_answers_503(garden):
    garden.applied([model("a")])
    gateway = Gateway(garden)
    client = gateway.client()

    garden.applied([model("a"), model("b")])
    appeared = wait_until(lambda: "b" in {m.id for m in client.models.list().data})
    reply = client.completions.create(model="b", prompt="new", max_tokens=1)
    os.kill(garden.pids()[garden.worker_id("a")], signal.SIGKILL)
    gone = wait_until(lambda: "a" not in gateway.models())
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="a", prompt="x", max_tokens=1)

    assert appeared and reply.choices[0].text == " new"
    assert gone
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["code"] == "model_not_ready"


def test_a_killed_replica_fails_over_to_the_other(garden):
    garden.applied([model("duo", replicas=2)])
    gateway = Gateway(garden, "--refresh", "3600")  # it must not learn of the death meanwhile
    client = gateway.client().with_raw_response
    os.kill(garden.pids()[garden.worker_id("duo", 0)], signal.SIGKILL)

    answers = [client.completions.create(model="duo", prompt="x", max_tokens=1)
               for _ in range(3)]

    assert {a.headers["x-gardenctl-worker"] for a in answers} == {garden.worker_id("duo", 1)}
    assert [a.parse().choices[0].text for a in answers] == [" x"] * 3
    assert gateway.metric("gardenctl_gateway_failovers_total", model="duo") >= 1


def test_health_is_503_until_the_garden_file_can_be_read(garden):
    garden.file.write_text("name: [this is not a name\n")
    gateway = Gateway(garden, wait_ok=False)
    broken = gateway.get("/health")[0]
    write_garden(garden, [model("later")])  # valid; never applied
    fixed = wait_until(lambda: gateway.get("/health")[0] == 200)

    assert broken == 503
    assert fixed


# -- streaming: these run once the stand-in streams -----------------------------------------

def test_a_streamed_chat_arrives_chunk_by_chunk(served):
    stream = served.client(GATEWAY_KEY).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "a b c"}], max_tokens=6,
        stream=True)
    chunks = [c for c in stream if c.choices]

    assert len(chunks) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks).split() == \
        ["a", "b", "c", "a", "b", "c"]


def test_a_client_that_goes_away_ends_the_upstream_request(served):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"model": "alpha", "prompt": "x", "max_tokens": 100000, "stream": True}),
        headers={"Authorization": f"Bearer {GATEWAY_KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    first = response.read1(64)
    in_flight = served.metric("gardenctl_gateway_requests_in_flight", model="alpha")
    connection.close()

    assert response.status == 200 and first
    assert in_flight == 1
    assert wait_until(lambda: served.metric("gardenctl_gateway_requests_in_flight",
                                            model="alpha") == 0)
    assert served.metric("gardenctl_gateway_requests_total", model="alpha", code="499") >= 1


def test_200_concurrent_streams_all_complete(served):
    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": f"w{i}"}], max_tokens=4,
            stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=served.url, api_key=GATEWAY_KEY, max_retries=0,
                                      timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    texts = asyncio.run(all_of_them())

    assert [t.split() for t in texts] == [[f"w{i}"] * 4 for i in range(200)]
