"""`POST /chat`'s options: honoured wherever a client puts them (JSON body, form fields, query string),
an unknown or doubled one refused with a 400 naming it, and max_new_tokens bounding the answer alone."""
import json

import pytest
import requests

from omni import Task, load_audio, prompt_length
from tests.http_client import Server

MAX = 120  # max_tokens for quick answers on the tiny checkpoint
NEW = 40  # max_new_tokens: decode steps of the answer alone


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("options-tmp"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def url(server):
    return f"http://127.0.0.1:{server.port}/chat"


def _error(resp: requests.Response) -> str:
    assert resp.headers["Content-Type"] == "application/json", resp.text
    return resp.json()["error"]


def test_query_options_are_honoured_with_an_upload(server, url, sample_wav):
    _, _, official = server.chat(sample_wav.read_bytes(), max_tokens=MAX)
    with sample_wav.open("rb") as f:
        resp = requests.post(f"{url}?max_tokens={MAX}", files={"audio": f}, timeout=120)
    assert resp.status_code == 200 and resp.content == official


def test_unknown_query_key_and_form_field_are_named(url, sample_wav):
    with sample_wav.open("rb") as f:
        resp = requests.post(f"{url}?formt=wav", files={"audio": f}, timeout=60)
    assert resp.status_code == 400 and "formt" in _error(resp)
    with sample_wav.open("rb") as f:
        resp = requests.post(url, files={"audio": f}, data={"max_token": "5"}, timeout=60)
    assert resp.status_code == 400 and "max_token" in _error(resp)
    with sample_wav.open("rb") as f:
        resp = requests.post(url, files={"audio": f, "picture": b"x"}, timeout=60)
    assert resp.status_code == 400 and "picture" in _error(resp)


def test_an_option_given_twice_or_both_bounds_are_refused(url, sample_wav):
    with sample_wav.open("rb") as f:
        resp = requests.post(f"{url}?max_tokens={MAX}", files={"audio": f}, data={"max_tokens": str(MAX)},
                             timeout=60)
    assert resp.status_code == 400 and "max_tokens" in _error(resp)
    body = json.dumps({"audio": "AAAA", "max_tokens": MAX, "max_new_tokens": NEW})
    resp = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert resp.status_code == 400 and "max_new_tokens" in _error(resp)


def test_max_new_tokens_counts_the_answer_only(server, sample_wav):
    prompt = prompt_length(Task.A1A2, load_audio(sample_wav.read_bytes()), None)
    _, _, bounded = server.chat(sample_wav.read_bytes(), max_tokens=prompt + NEW)
    status, headers, answer = server.chat(sample_wav.read_bytes(), max_new_tokens=NEW)
    assert status == 200 and answer == bounded
    assert server.record(headers)["steps"] <= NEW + 1
    status, _, data = server.chat(sample_wav.read_bytes(), max_new_tokens=0)
    assert status == 400 and "max_new_tokens" in json.loads(data)["error"]
