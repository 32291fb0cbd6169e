"""Mini-Omni2: strict loading, CLIP, image preprocessing, the image prompt, and image questions end to end.

`golden/official_vision_tokens.json` holds the token streams that the official mini-omni2 vision path
(with the mini-omni/CLIP fork) produced, run unmodified on CPU, for the checkpoints these tests build.
"""
import base64
import hashlib
import io
import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

import omni.checkpoint as ckpt_mod
import omni.image as image_mod
from omni.clip import load_vision_tower, read_visual_state
from omni.errors import CheckpointError, ImageInputError
from omni.image import CLIP_MEAN, CLIP_STD, crop_box, load_image, open_image, resized_size
from omni.tokens import (
    ANSWER_A, ANSWER_T, EOA, EOIMAGE, IMAGE, IMAGE_TOKENS, INPUT_A, PAD_A, PAD_T, Task, audio_id, build_image_prompt,
)
from omni_engine import OmniEngine
from tests.conftest import ROOT, FakeResponse
from tests.http_client import Server

GOLDEN = json.loads((Path(__file__).parent / "golden" / "official_vision_tokens.json").read_text())
MAX = 160  # max_tokens for quick answers: an image prompt of the 1.2 s sample takes 115, then 45 steps


def _mirrored(path: Path) -> Image.Image:
    return ImageOps.mirror(Image.open(path))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("ckpt, case", [("tiny", "image1.jpg"), ("tiny", "image1.jpg mirrored"),
                                        ("stop", "image1.jpg mirrored")])
def test_streams_equal_the_official_ones(request, sample_image, ckpt, case):
    golden = GOLDEN["checkpoints"][ckpt]
    if ckpt == "tiny":
        engine = request.getfixturevalue("vision_engine")
    else:
        engine = OmniEngine(request.getfixturevalue("vision_stop_ckpt"), device="cpu")
    image = _mirrored(sample_image) if case.endswith("mirrored") else sample_image
    result = engine.run(ROOT / golden["question_audio"], image=image, max_tokens=golden["max_tokens"])
    assert result.streams == golden["streams"][case]


def test_the_stop_case_ends_on_its_own():
    streams = GOLDEN["checkpoints"]["stop"]["streams"]["image1.jpg mirrored"]
    assert 151936 in streams[7] and len(streams[7]) < 700 - 60 - 55  # EOT, then EOA well before max_tokens


def test_every_image_source_gives_the_same_answer(vision_engine, sample_wav, sample_image):
    decoded = Image.open(sample_image)
    reference = vision_engine.run(sample_wav, image=sample_image, max_tokens=MAX).streams
    for source in (str(sample_image), sample_image.read_bytes(), decoded, np.array(decoded.convert("RGB"))):
        assert vision_engine.run(sample_wav, image=source, max_tokens=MAX).streams == reference
    without = vision_engine.run(sample_wav, max_tokens=MAX).streams
    assert without != reference and len(without[7]) > len(reference[7])  # the image prompt is 52 positions longer


def test_a_v2_checkpoint_loads_strictly(vision_ckpt, tmp_path):
    broken = tmp_path / "v2"
    shutil.copytree(vision_ckpt, broken)
    state = torch.load(broken / "lit_model.pth", weights_only=True)
    del state["vision_adapter.fc_1.weight"]
    torch.save(state, broken / "lit_model.pth")
    with pytest.raises(CheckpointError, match="missing.*vision_adapter.fc_1.weight"):
        OmniEngine(broken, device="cpu")


def test_v1_weights_under_a_v2_config_are_refused(tiny_ckpt, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_ckpt, mixed)
    raw = yaml.safe_load((mixed / "model_config.yaml").read_text())
    (mixed / "model_config.yaml").write_text(yaml.safe_dump({**raw, "vision_adapter_dim": 512}))
    with pytest.raises(CheckpointError, match="vision_adapter"):
        OmniEngine(mixed, device="cpu")


def test_clip_returns_all_50_tokens_with_fp16_valued_weights(vision_ckpt, vision_engine, sample_image):
    tower = vision_engine.vision
    with torch.inference_mode():
        out = tower(load_image(sample_image).unsqueeze(0))
    assert out.shape == (1, IMAGE_TOKENS, 512) and out.dtype == torch.float32
    stored = read_visual_state(vision_ckpt / "ViT-B-32.pt")
    assert stored["conv1.weight"].dtype == torch.float16  # as OpenAI's file
    assert torch.equal(tower.conv1.weight, stored["conv1.weight"].float())
    assert torch.equal(tower.ln_pre.weight, stored["ln_pre.weight"])  # LayerNorms keep fp32


def test_clip_also_loads_from_a_plain_state_dict(vision_ckpt, tmp_path, sample_image):
    plain = tmp_path / "ViT-B-32.pt"
    torch.save({f"visual.{k}": v for k, v in read_visual_state(vision_ckpt / "ViT-B-32.pt").items()}, plain)
    pixels = load_image(sample_image).unsqueeze(0)
    with torch.inference_mode():
        a = load_vision_tower(plain, torch.device("cpu"))(pixels)
        b = load_vision_tower(vision_ckpt / "ViT-B-32.pt", torch.device("cpu"))(pixels)
    assert torch.equal(a, b)


def test_a_tower_of_the_wrong_geometry_is_refused(vision_ckpt, tmp_path):
    state = {f"visual.{k}": v for k, v in read_visual_state(vision_ckpt / "ViT-B-32.pt").items()}
    state["visual.positional_embedding"] = torch.zeros(197, state["visual.positional_embedding"].size(1))
    torch.save(state, tmp_path / "vit16.pt")
    with pytest.raises(CheckpointError, match="50 tokens"):
        load_vision_tower(tmp_path / "vit16.pt", torch.device("cpu"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_vision_tower(tmp_path / "junk.pt", torch.device("cpu"))


@pytest.mark.parametrize("size, resized, box", [
    ((320, 240), (298, 224), (37, 0, 261, 224)),  # docs/model.md §7's worked example
    ((240, 320), (224, 298), (0, 37, 224, 261)),
    ((299, 224), (299, 224), (38, 0, 262, 224)),  # 37.5 rounds half to even: 38
    ((297, 224), (297, 224), (36, 0, 260, 224)),  # 36.5 -> 36
    ((1, 1), (224, 224), (0, 0, 224, 224)),
    ((1001, 225), (996, 224), (386, 0, 610, 224)),  # int() truncates 996.4
])
def test_resize_and_crop_follow_torchvision(size, resized, box):
    assert resized_size(*size) == resized and crop_box(*resized) == box


def test_preprocessing_values():
    wide = np.zeros((224, 448, 3), np.uint8)
    wide[:, 112:336] = (10, 20, 30)  # only the centre crop survives, unresized
    pixels = load_image(wide)
    expected = [(np.float32(v) / np.float32(255) - np.float32(m)) / np.float32(s)
                for v, m, s in zip((10, 20, 30), CLIP_MEAN, CLIP_STD)]
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    for channel in range(3):
        assert torch.all(pixels[channel] == torch.tensor(expected[channel]))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_image_modes_become_rgb(sample_image, mode):
    image = Image.open(sample_image).convert(mode)
    pixels = load_image(_png(image) if mode != "CMYK" else image)
    assert pixels.shape == (3, 224, 224) and torch.isfinite(pixels).all()
    if mode == "L":  # grey: three equal channels before normalisation
        raw = pixels * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
        assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)


def test_prompt_layout():
    L = 7
    rows = [build_image_prompt(task, L) for task in (Task.A1A2, Task.A1T2)]
    for prompt, last in zip(rows, (ANSWER_A, PAD_A)):
        assert prompt.shape == (8, L + 55)
        for layer in range(7):
            expected = [IMAGE] + [PAD_A] * 50 + [EOIMAGE, INPUT_A] + [PAD_A] * L + [EOA, last]
            assert prompt[layer].tolist() == [audio_id(a, layer) for a in expected]
        assert prompt[7].tolist() == [PAD_T] * (L + 54) + [ANSWER_T]
    with pytest.raises(ValueError, match="A1A2 and A1T2"):
        build_image_prompt(Task.T1A2, L)


def test_feature_positions_include_the_official_off_by_one(vision_engine):
    model, L = vision_engine.model, 5
    idx = torch.stack([build_image_prompt(Task.A1A2, L)])
    audio = torch.randn(1, L, model.config.whisper_adapter_dim)
    image = torch.randn(1, IMAGE_TOKENS, model.config.vision_adapter_dim)
    with torch.inference_mode():
        plain = model.embed(idx)
        injected = model.embed(idx, audio, image)
    changed = (plain != injected).any(-1)[0].nonzero().flatten().tolist()
    # CLIP at 1..50; Whisper at 52..51+L, over INPUT_A (52); the last PAD_A (52+L) stays a token embedding
    assert changed == list(range(1, 51)) + list(range(52, 52 + L))


def test_image_errors(engine, vision_engine, sample_wav, sample_image, tmp_path):
    with pytest.raises(ValueError, match="cannot see.*Mini-Omni2"):
        engine.stream(sample_wav, image=sample_image)
    with pytest.raises(ValueError, match="task A1A2.*T1A2 takes none"):
        vision_engine.stream(text="hi", task="T1A2", image=sample_image)
    with pytest.raises(ImageInputError, match="not an image"):
        vision_engine.stream(sample_wav, image=sample_wav.read_bytes())
    truncated = sample_image.read_bytes()[:2000]
    with pytest.raises(ImageInputError, match="corrupt or truncated"):
        vision_engine.stream(sample_wav, image=truncated)
    with pytest.raises(ImageInputError, match="uint8"):
        vision_engine.stream(sample_wav, image=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageInputError, match="empty"):
        vision_engine.stream(sample_wav, image=np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError):
        vision_engine.stream(sample_wav, image=tmp_path / "nope.jpg")
    with pytest.raises(TypeError):
        vision_engine.stream(sample_wav, image=12)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_huge_images_are_shrunk_before_decoding_fully(monkeypatch, fmt):
    monkeypatch.setattr(image_mod, "MAX_SOURCE_PIXELS", 400 * 300 // 5)
    out = io.BytesIO()
    Image.new("RGB", (400, 300), (90, 120, 200)).save(out, format=fmt)
    image = open_image(out.getvalue())
    assert image.width * image.height <= 400 * 300 // 5 and image.width / image.height == pytest.approx(4 / 3, rel=0.01)
    assert load_image(out.getvalue()).shape == (3, 224, 224)


def test_decompression_bombs_and_extreme_shapes(monkeypatch):
    out = io.BytesIO()
    Image.new("RGB", (4000, 10)).save(out, format="PNG")
    assert open_image(out.getvalue()).size == (160, 10)  # cropped to 16:1 around the centre
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="too large"):
        open_image(out.getvalue())


def test_cli_answers_an_image_question(vision_ckpt, sample_wav, sample_image, tmp_path):
    out, dump = tmp_path / "a.wav", tmp_path / "t.json"
    golden = GOLDEN["checkpoints"]["tiny"]
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--ckpt-dir", str(vision_ckpt),
                           "--input", str(ROOT / golden["question_audio"]), "--image", str(sample_image),
                           "--out", str(out), "--dump-tokens", str(dump), "--max-tokens", str(golden["max_tokens"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(dump.read_text())["streams"] == golden["streams"]["image1.jpg"]
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0


def test_official_vision_class(vision_ckpt, sample_wav, sample_image, tmp_path):
    from inference import OmniVisionInference

    client = OmniVisionInference(str(vision_ckpt), device="cpu")
    saved = tmp_path / "answer.wav"
    chunks = list(client.run_vision_AA_batch_stream(str(sample_wav), str(sample_image), max_returned_tokens=MAX + 40,
                                                    save_path=str(saved)))
    assert all(isinstance(pcm, bytes) and isinstance(text, str) for pcm, text in chunks)
    assert len(chunks[0][0]) == 16384 and saved.stat().st_size == 44 + sum(len(p) for p, _ in chunks)
    first = list(client.run_vision_AA_batch_stream(str(sample_wav), str(sample_image), max_returned_tokens=MAX + 40,
                                                   warm_up=True))
    assert len(first) == 1 and first[0][0] == chunks[0][0]


@pytest.fixture(scope="module")
def vision_server(vision_ckpt, tmp_path_factory):
    srv = Server(vision_ckpt, tmp_path_factory.mktemp("vision-server-tmp"))
    yield srv
    srv.stop()


def test_server_answers_image_questions(vision_server, vision_engine, sample_wav, sample_image):
    assert vision_server.get_json("/health")["can_see"] is True
    expected = vision_engine.run(sample_wav, image=sample_image, max_tokens=MAX).pcm
    status, _, body = vision_server.chat(sample_wav.read_bytes(), image=_b64(sample_image.read_bytes()), max_tokens=MAX)
    assert status == 200 and len(body) >= 3 * 16384 and body == expected
    png = _png(Image.open(sample_image))  # same pixels, lossless: same answer
    assert vision_server.chat(sample_wav.read_bytes(), image=_b64(png), max_tokens=MAX)[2] == expected
    boundary = "imgboundary"
    form = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.bin\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        for name, data in (("audio", sample_wav.read_bytes()), ("image", sample_image.read_bytes()))
    ) + f"--{boundary}\r\nContent-Disposition: form-data; name=\"max_tokens\"\r\n\r\n{MAX}\r\n--{boundary}--\r\n".encode()
    status, _, body = vision_server.request("POST", "/chat", form,
                                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and body == expected


def test_server_refuses_bad_images_and_keeps_serving(vision_server, sample_wav, sample_image):
    for image, message in ((b"not an image", "not an image"), (sample_image.read_bytes()[:2000], "truncated")):
        status, headers, data = vision_server.chat(sample_wav.read_bytes(), image=_b64(image), max_tokens=MAX)
        assert status == 400 and message in json.loads(data)["error"]
    assert vision_server.chat(sample_wav.read_bytes(), max_tokens=MAX)[0] == 200
    assert [p.name for p in vision_server.tmpdir.iterdir() if not p.name.startswith("torchinductor")] == []


def test_clip_is_downloaded_and_verified_when_absent(vision_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "v2"
    shutil.copytree(vision_ckpt, ckpt)
    blob = (ckpt / "ViT-B-32.pt").read_bytes()
    (ckpt / "ViT-B-32.pt").unlink()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    requested = []

    def fake_urlopen(request):
        requested.append(request.full_url)
        return FakeResponse(blob)

    monkeypatch.setattr(torch.hub, "urlopen", fake_urlopen)
    with pytest.raises(CheckpointError, match="sha256"):
        OmniEngine(ckpt, device="cpu")
    assert requested == [ckpt_mod.CLIP_VIT_B32_URL] and not list((tmp_path / "cache" / "clip").iterdir())
    monkeypatch.setattr(ckpt_mod, "CLIP_VIT_B32_SHA256", hashlib.sha256(blob).hexdigest())
    assert OmniEngine(ckpt, device="cpu").can_see
    assert (tmp_path / "cache" / "clip" / "ViT-B-32.pt").read_bytes() == blob


def test_fast_mode_quantizes_the_vision_adapter_too(vision_ckpt, sample_wav, sample_image):
    """No fp32 matrix may keep the memory-mapped checkpoint alive in fast mode (the vision adapter included)."""
    fast = OmniEngine(vision_ckpt, device="cpu", mode="fast")
    assert [name for name, m in fast.model.named_modules() if type(m) is torch.nn.Linear] == []
    assert sum(len(c.pcm) for c in fast.stream(sample_wav, image=sample_image, max_tokens=MAX)) > 0
