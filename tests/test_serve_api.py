"""The serving API over real HTTP on 127.0.0.1 (uvicorn in a thread), driven by the official
``openai`` client where a client would be used: every answer equals a plain greedy ``generate``
on that adapter alone (``serve_helpers.reference_ids``, decoded), streamed or not, alone or eight
at once; a closed stream frees its slot; every bad request gets OpenAI's error shape with the
right status and the server keeps serving; an exposed server wants its key and refuses a
rebinding Host. One engine on the tiny chat model for the whole module."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_helpers import chat_prompt, make_adapters, reference_ids
from studio.serve.api import create_app
from studio.serve.catalog import Catalog

BASE = "tiny"
NAMES = ["lora1", "lora2", "ia3", "prompt"]  # two mixable LoRAs, two that are answered apart
QUESTION = "Name three colours."
TOKENS = 8


class Server:
    """A uvicorn server for ``app`` on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    return make_adapters(tiny_chat_model, tmp_path_factory.mktemp("api-adapters"), names=NAMES)


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    from studio.serve.engine import ServeEngine

    engine = ServeEngine.load(str(tiny_chat_model), BASE, max_active=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine, adapters):
    """The module's server: the four adapters from the catalog, adapter admin on, loading only
    from the adapters' root."""
    root = next(iter(adapters.values())).parent
    catalog = Catalog(BASE, BASE, dict(adapters), [root.resolve()])
    served = Server(create_app(engine, catalog, api_key=None, host="127.0.0.1", port=0,
                               allow_adapter_admin=True))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def references(tiny_chat_model, adapters, engine):
    """{model: (chat prompt ids, greedy answer ids, completion prompt ids, answer ids)}."""
    tokenizer = engine.tokenizer
    chat_ids = chat_prompt(tokenizer, QUESTION)
    text_ids = tokenizer(QUESTION)["input_ids"]
    out = {}
    for name, folder in [(BASE, None), *adapters.items()]:
        out[name] = (chat_ids, reference_ids(tiny_chat_model, folder, chat_ids, TOKENS),
                     text_ids, reference_ids(tiny_chat_model, folder, text_ids, TOKENS))
    return out


def decoded(engine, ids):
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def ask(client, model, **extra):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=TOKENS, temperature=0, **extra)


def test_models_lists_the_base_and_each_adapter_with_its_parent(client, adapters):
    listed = {m.id: m for m in client.models.list().data}
    assert list(listed)[0] == BASE and set(listed) == {BASE, *NAMES}
    assert listed[BASE].parent is None
    for name in NAMES:
        assert listed[name].parent == BASE and listed[name].object == "model"
    assert listed["ia3"].method == "ia3" and listed["lora1"].method == "lora"


def test_each_model_answers_as_generate_on_it_alone(client, engine, references):
    for model in [BASE, "lora1", "ia3", "prompt"]:
        chat_ids, chat_ref, text_ids, text_ref = references[model]
        answer = ask(client, model)
        assert answer.object == "chat.completion" and answer.model == model
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == decoded(engine, chat_ref), model
        assert answer.usage.prompt_tokens == len(chat_ids)
        assert answer.usage.completion_tokens == len(chat_ref)
        assert answer.usage.total_tokens == len(chat_ids) + len(chat_ref)
        assert answer.choices[0].finish_reason == ("length" if len(chat_ref) == TOKENS else "stop")
        text = client.completions.create(model=model, prompt=QUESTION, max_tokens=TOKENS, temperature=0)
        assert text.object == "text_completion"
        assert text.choices[0].text == decoded(engine, text_ref), model
        assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (len(text_ids), len(text_ref))
    # the adapters really change the answer, else the equalities above could not fail
    assert len({tuple(references[m][1]) for m in [BASE, *NAMES]}) >= 4


def test_a_stream_joins_to_the_whole_answer_with_usage_last(client, engine, references):
    chunks = list(ask(client, "lora2", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == decoded(engine, references["lora2"][1])
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(references["lora2"][1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    streamed = client.completions.create(model="ia3", prompt=QUESTION, max_tokens=TOKENS, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == decoded(engine, references["ia3"][3])


def test_eight_concurrent_streams_over_four_adapters_each_equal_its_answer(client, engine, references):
    models = NAMES * 2
    start = threading.Barrier(len(models))

    def stream(model):
        start.wait()  # all eight sent together
        parts = ask(client, model, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in parts if c.choices]
        return "".join(pieces)

    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(stream, models))
    for model, answer in zip(models, answers):
        assert answer == decoded(engine, references[model][1]), model
    assert engine.stats()["max_batch_seen"] >= 2  # they were answered together, not one by one


def test_a_client_that_goes_away_frees_its_slot(server, engine, monkeypatch):
    """A stream closed after its first event, and a non-streamed request whose client timed out:
    both completions are cancelled and the engine runs nothing afterwards."""
    seen = []
    submit = engine.submit

    def recording(*args, **kwargs):  # observe the handle; the engine itself is untouched
        seen.append(submit(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(engine, "submit", recording)
    body = {"model": "lora1", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 400,
            "temperature": 0}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
            assert resp.status_code == 200
            assert next(resp.iter_lines()).startswith("data: ")  # the role: the request is decoding
        with pytest.raises(httpx.ReadTimeout):
            http.post(server.url + "/v1/chat/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    for completion in seen:
        while completion.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert completion.finish_reason == "cancelled" and completion.completion_tokens < 400
    assert len(seen) == 2
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats()["running"] == 0


BAD = [  # (body changes, status, param, words in the message)
    ({"model": "nope"}, 404, "model", "nope"),
    ({"temperature": "hot"}, 400, "temperature", "temperature"),
    ({"temperature": 3}, 400, "temperature", "temperature"),
    ({"top_p": 0}, 400, "top_p", "top_p"),
    ({"messages": 3}, 400, "messages", "messages"),
    ({"messages": None}, 400, "messages", "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content", "text"),
    ({"max_tokens": 100000}, 400, "max_tokens", "512"),
    ({"max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
    ({"n": 2}, 400, "n", "n=1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "4"),
    ({"seed": -1}, 400, "seed", "seed"),
    ({"stream": "yes please"}, 400, "stream", "stream"),
    ({"ignore_eos": "sometimes"}, 400, "ignore_eos", "ignore_eos"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, None, "context is 512 tokens"),
]


def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(server, client, engine, references):
    good = {"model": "lora1", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS,
            "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for change, status, param, words in BAD:
            resp = http.post("/v1/chat/completions", json={**good, **change})
            error = resp.json()["error"]
            assert resp.status_code == status, (change, error)
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == param and words in error["message"], (change, error)
        missing = http.post("/v1/chat/completions", json={"model": "lora1"})
        assert missing.status_code == 400 and missing.json()["error"]["message"] == "messages: this field is required"
        for raw in (b'{"model": "lora1", "messages": [', b"[1, 2]", b"\xff\xfe"):
            resp = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"], raw
        huge = http.post("/v1/completions", json={"model": "lora1", "prompt": "x" * (1 << 20)})
        assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
        chunked = http.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * (1 << 20), b'"}']))
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]["message"]
        two = http.post("/v1/completions", json={"model": "lora1", "prompt": ["a", "b"]})
        assert two.status_code == 400 and two.json()["error"]["param"] == "prompt"
        nowhere = http.get("/v1/engines")
        assert nowhere.status_code == 404 and "error" in nowhere.json()
    with pytest.raises(openai.NotFoundError, match="nope"):
        ask(client, "nope")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask(client, "lora1", extra_body={"temperature": "hot"})
    answer = ask(client, "lora1")  # still serving, and still right
    assert answer.choices[0].message.content == decoded(engine, references["lora1"][1])


def test_adapters_load_only_from_allowed_folders_and_unload(server, client, adapters, tmp_path, engine):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        inside = http.post("/v1/adapters", json={"name": "again", "path": str(adapters["lora2"])})
        assert inside.status_code == 200 and inside.json()["parent"] == BASE
        escape = adapters["lora2"].parent / f"escape-{tmp_path.name}"  # inside the root, by name only
        escape.symlink_to(tmp_path, target_is_directory=True)
        for path, status in ((str(tmp_path), 403), ("/etc", 403), (str(escape), 403),
                             (str(adapters["lora2"].parent), 400), (str(tmp_path / "missing"), 400)):
            resp = http.post("/v1/adapters", json={"name": "x", "path": path})
            assert resp.status_code == status, (path, resp.json())
        taken = http.post("/v1/adapters", json={"name": "lora1", "path": str(adapters["lora2"])})
        assert taken.status_code == 400 and taken.json()["error"]["param"] == "name"
        assert ask(client, "again").choices[0].message.content == ask(client, "lora2").choices[0].message.content
        assert http.delete("/v1/adapters/again").json()["deleted"] is True
        assert http.delete("/v1/adapters/again").status_code == 404
        assert http.delete(f"/v1/adapters/{BASE}").status_code == 400
    assert "again" not in {m.id for m in client.models.list().data}


@pytest.fixture(scope="module")
def exposed(engine):
    """A second app as if started on 0.0.0.0: a key, no admin, one page allowed by --cors-origin,
    and no room in its waiting queue (a second engine over the same base model, max_waiting 0:
    every request is busy)."""
    from studio.serve.engine import ServeEngine

    busy = ServeEngine(engine.base, engine.tokenizer, BASE, max_waiting=0)
    served = Server(create_app(busy, Catalog(BASE, BASE, {}, []), api_key="s3cret", host="0.0.0.0", port=0,
                               cors_origins=("http://chat.example:3000",)))
    yield served
    served.stop()
    busy.close()


def test_an_exposed_server_wants_its_key_and_refuses_rebinding(exposed):
    with pytest.raises(ValueError, match="API key"):
        create_app(None, Catalog(BASE, BASE, {}, []), api_key=None, host="0.0.0.0", port=0)
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=exposed.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with httpx.Client(base_url=exposed.url, timeout=10) as http:
        none = http.get("/v1/models")
        assert none.status_code == 401 and "missing API key" in none.json()["error"]["message"]
        right = {"authorization": "Bearer s3cret"}
        assert http.get("/v1/models", headers=right).json()["data"][0]["id"] == BASE
        rebound = http.get("/v1/models", headers={**right, "host": f"evil.example:{exposed.port}"})
        assert rebound.status_code == 421 and "DNS rebinding" in rebound.json()["error"]["message"]
        foreign = http.get("/v1/models", headers={**right, "origin": "http://evil.example"})
        assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
        page = {"origin": "http://chat.example:3000"}  # the page allowed with --cors-origin
        allowed = http.get("/v1/models", headers={**right, **page, "sec-fetch-site": "cross-site"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == page["origin"]
        preflight = http.options("/v1/chat/completions", headers={
            **page, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type"})
        assert preflight.status_code == 200
        off = http.post("/v1/adapters", headers=right, json={"name": "a", "path": "/tmp"})
        assert off.status_code == 403 and "--allow-adapter-admin" in off.json()["error"]["message"]
    keyed = openai.OpenAI(base_url=exposed.url + "/v1", api_key="s3cret", max_retries=0)
    with pytest.raises(openai.RateLimitError, match="busy"):
        keyed.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
