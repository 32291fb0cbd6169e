"""Checkpoint discovery, download (network faked) and strict loading."""
import hashlib
import shutil
import urllib.error

import pytest
import torch
import yaml

import omni.checkpoint as ckpt_mod
from omni.checkpoint import SNAC_DIR, WEIGHTS_FILE, WHISPER_FILE
from omni.errors import CheckpointDownloadError, CheckpointError
from omni_engine import OmniEngine
from tests.conftest import FakeResponse


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def test_offline_download_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        (tmp_path / "absent").mkdir()  # the hub client may create the directory before failing
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointDownloadError) as err:
        OmniEngine(tmp_path / "absent", device="cpu")
    message = str(err.value)
    assert "lit_model.pth" in message and "model_config.yaml" in message
    assert f"hf download gpt-omni/mini-omni --local-dir {tmp_path / 'absent'}" in message
    assert not (tmp_path / "absent").exists()  # no empty directory left to confuse the next run


@pytest.mark.parametrize("family, repo", [("mini-omni", "gpt-omni/mini-omni"), ("mini-omni2", "gpt-omni/mini-omni2")])
def test_missing_directory_is_downloaded(tiny_ckpt, tmp_path, monkeypatch, family, repo):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, local_dir, revision):
        calls.append(repo_id)
        shutil.copytree(tiny_ckpt, local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    path = ckpt_mod.ensure_checkpoint(tmp_path / "new", family)
    assert calls == [repo] and (path / WEIGHTS_FILE).is_file()


def test_existing_directory_missing_a_file(ckpt_copy):
    (ckpt_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="lacks lit_model.pth.*hf download"):
        OmniEngine(ckpt_copy, device="cpu")


def test_unknown_family():
    with pytest.raises(ValueError, match="family"):
        ckpt_mod.ensure_checkpoint("x", "mini-omni9")


def _edit_weights(path, edit):
    state = torch.load(path / WEIGHTS_FILE, weights_only=True)
    edit(state)
    torch.save(state, path / WEIGHTS_FILE)


def test_mismatched_tensors_are_named(ckpt_copy):
    def edit(state):
        del state["transformer.h.1.mlp.proj.weight"]
        state["transformer.h.0.attn.attn.bias_typo"] = state.pop("transformer.h.0.attn.attn.bias")
        state["transformer.ln_f.weight"] = torch.ones(3)

    _edit_weights(ckpt_copy, edit)
    with pytest.raises(CheckpointError) as err:
        OmniEngine(ckpt_copy, device="cpu")
    message = str(err.value)
    for name in ("transformer.h.1.mlp.proj.weight", "attn.attn.bias_typo", "transformer.ln_f.weight (3,)"):
        assert name in message


def test_the_embedding_wins_over_a_different_stored_head(ckpt_copy):
    _edit_weights(ckpt_copy, lambda s: s.__setitem__("lm_head.weight", torch.zeros_like(s["lm_head.weight"])))
    engine = OmniEngine(ckpt_copy, device="cpu")
    wte = torch.load(ckpt_copy / WEIGHTS_FILE, weights_only=True)["transformer.wte.weight"]
    x = torch.randn(2, wte.size(1))
    with torch.inference_mode():  # whatever parts the mode installed: one table, the embedding's values
        torch.testing.assert_close(engine.model.lm_head(x), x @ wte.T, rtol=1e-4, atol=1e-4)
        assert torch.equal(engine.model.transformer.wte(torch.arange(9)), wte[:9])


def test_unsupported_architecture_is_refused(ckpt_copy):
    path = ckpt_copy / "model_config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["norm_class_name"] = "LayerNorm"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CheckpointError, match="norm_class_name"):
        OmniEngine(ckpt_copy, device="cpu")


def test_whisper_is_downloaded_and_verified(ckpt_copy, tmp_path, monkeypatch):
    blob = (ckpt_copy / WHISPER_FILE).read_bytes()
    (ckpt_copy / WHISPER_FILE).unlink()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "urlopen", lambda request: FakeResponse(blob))
    with pytest.raises(CheckpointDownloadError, match="sha256"):
        ckpt_mod.whisper_path(ckpt_copy)
    assert not list((tmp_path / "cache" / "whisper").iterdir())  # no partial file left
    monkeypatch.setattr(ckpt_mod, "WHISPER_SMALL_SHA256", hashlib.sha256(blob).hexdigest())
    path = ckpt_mod.whisper_path(ckpt_copy)
    assert path == tmp_path / "cache" / "whisper" / WHISPER_FILE and path.read_bytes() == blob
    assert OmniEngine(ckpt_copy, device="cpu").whisper is not None


def test_whisper_offline(ckpt_copy, tmp_path, monkeypatch):
    (ckpt_copy / WHISPER_FILE).unlink()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(request):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(CheckpointDownloadError, match="small.pt.*curl -L -o small.pt"):
        ckpt_mod.whisper_path(ckpt_copy)


def test_snac_falls_back_to_the_hub(ckpt_copy, tmp_path, monkeypatch):
    import huggingface_hub

    hub = tmp_path / "hub"
    shutil.move(ckpt_copy / SNAC_DIR, hub)
    requested = []

    def fake_hf_hub_download(repo_id, filename):
        requested.append((repo_id, filename))
        return str(hub / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    assert ckpt_mod.snac_dir(ckpt_copy) == hub
    assert requested == [("hubertsiuzdak/snac_24khz", "config.json"), ("hubertsiuzdak/snac_24khz", "pytorch_model.bin")]

    def offline(repo_id, filename):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointDownloadError, match="hf download hubertsiuzdak/snac_24khz"):
        ckpt_mod.snac_dir(ckpt_copy)


def test_whisper_file_must_be_whisper(ckpt_copy):
    (ckpt_copy / WHISPER_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="openai-whisper"):
        OmniEngine(ckpt_copy, device="cpu")
