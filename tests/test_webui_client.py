"""The pages' HTTP client against the real server process: answers, and every failure as a readable message."""
import io
import time
import wave
from contextlib import closing

import pytest

from tests.http_client import Server, free_port
from webui import omni_gradio, omni_streamlit
from webui.client import Answer, OmniClient, ServerError, server_options, wav_bytes

MAX = 120  # max_tokens: a short answer on the tiny checkpoint
LONG = 1200  # an answer that keeps the engine busy while another request arrives


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("client-server-tmp"), "--max-queue", "0", "--max-batch", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return OmniClient(f"http://127.0.0.1:{server.port}")


def test_health(client):
    health = client.health()
    assert health.status == "ready" and health.can_see is False


def test_answer_is_the_servers_official_stream(server, client, sample_wav):
    status, headers, pcm = server.chat(sample_wav.read_bytes(), max_tokens=MAX)  # raw PCM, the official v1 body
    text = server.record(headers)["text"]
    reply = Answer()
    for chunk in client.ask(sample_wav.read_bytes(), max_tokens=MAX):
        reply.add(chunk)
    reply.finish()
    assert status == 200 and bytes(reply.pcm) == pcm and reply.text == text
    assert 0 < reply.first_audio_s <= reply.total_s
    with wave.open(io.BytesIO(reply.wav())) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (24000, 1, len(pcm) // 2)
    assert "first audio after" in reply.timing() and "total" in reply.timing()


def test_refused_input_reads_as_a_message(client):
    with pytest.raises(ServerError, match="The server refused the question: could not decode"):
        list(client.ask(b"this is no audio"))


def test_image_refused_where_the_model_cannot_see(client, sample_wav):
    with pytest.raises(ServerError, match="cannot see"):
        list(client.ask(sample_wav.read_bytes(), image=b"\xff\xd8 a jpeg", max_tokens=MAX))


def test_busy_server_says_when_to_retry(server, client, sample_wav):
    conn, resp = server.open_chat(sample_wav.read_bytes(), max_tokens=LONG)  # holds the engine; no queue
    try:
        assert resp.status == 200 and resp.read(1024)
        with pytest.raises(ServerError, match=r"The server is busy .* Try again in 2 s"):
            list(client.ask(sample_wav.read_bytes(), max_tokens=MAX))
    finally:
        resp.close()
        conn.close()


def test_server_down_reads_as_a_message(sample_wav):
    down = OmniClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerError, match="Cannot reach the server .* is `python server.py` running"):
        down.health()
    with pytest.raises(ServerError, match="Cannot reach the server"):
        list(down.ask(sample_wav.read_bytes()))


LONG_QUESTION_S = 12  # a question of about 600 prompt positions, far more than a short answer's bound
SHORT_ANSWER = 40  # decode steps: --max-tokens 40 on a page
IDLE_TIMEOUT_S = 60  # for the server to finish cancelling an answer the test stopped reading


def _long_question(sample_wav) -> bytes:
    """The sample said over and over for LONG_QUESTION_S: a long question the tests make without a recorder."""
    with wave.open(str(sample_wav)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    repeats = -(-LONG_QUESTION_S * rate * 2 // len(frames))  # ceiling: at least LONG_QUESTION_S of int16 audio
    return wav_bytes(frames * repeats, rate)


def _idle(server) -> None:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while server.get_json("/health")["busy"]:
        assert time.monotonic() < deadline, "the stopped answer still holds the engine"
        time.sleep(0.1)


@pytest.mark.parametrize("page", [omni_gradio, omni_streamlit])
def test_pages_answer_a_long_question_whatever_their_length_setting(server, client, sample_wav, page):
    """A page's length option bounds the answer alone: a question longer than the bound is answered, not refused
    (as the server's prompt-counting max_tokens would refuse it)."""
    question = _long_question(sample_wav)
    _idle(server)  # the busy test's long answer may still be stopping (this server queues none)
    with pytest.raises(ServerError, match="leaves no room to answer"):
        list(client.ask(question, max_tokens=SHORT_ANSWER))
    reply = Answer()
    for chunk in client.ask(question, **server_options(page.parse_args(["--max-tokens", str(SHORT_ANSWER)]))):
        reply.add(chunk)
    status, headers, pcm = server.chat(question, max_new_tokens=SHORT_ANSWER)  # the same answer, asked directly
    assert status == 200 and bytes(reply.pcm) == pcm != b"" and server.record(headers)["steps"] <= SHORT_ANSWER
    with closing(client.ask(question, **server_options(page.parse_args([])))) as chunks:  # the page's default
        assert next(chunk for chunk in chunks if chunk.pcm)  # answered: its first audio came; no need to hear it all
    _idle(server)
