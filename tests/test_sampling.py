import pytest
import torch

from omni.sampling import GenerationConfig, sample


def test_greedy_is_argmax():
    logits = torch.randn(7, 4160)
    assert torch.equal(sample(logits, GenerationConfig()), logits.argmax(-1))
    assert torch.equal(sample(logits, GenerationConfig(top_k=None, temperature=0)), logits.argmax(-1))


def test_top_k_keeps_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    top3 = set(logits[0].topk(3).indices.tolist())
    cfg = GenerationConfig(top_k=3, temperature=5.0)
    assert {int(sample(logits, cfg)[0]) for _ in range(200)} <= top3


def test_top_p_keeps_the_most_likely():
    logits = torch.tensor([[10.0, 0.0, -1.0, -2.0]])
    cfg = GenerationConfig(top_k=None, top_p=0.5, temperature=1.0)
    assert {int(sample(logits, cfg)[0]) for _ in range(50)} == {0}


def test_sampling_is_deterministic_under_a_seed():
    logits = torch.randn(3, 100)
    cfg = GenerationConfig(top_k=None, temperature=1.0)
    torch.manual_seed(7)
    a = sample(logits, cfg)
    torch.manual_seed(7)
    assert torch.equal(a, sample(logits, cfg))


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("top_k", 0), ("top_k", 1.5), ("top_p", 0.0), ("top_p", 1.5),
    ("max_tokens", 1), ("stream_stride", 0), ("first_stride", 0), ("temperature", "hot"),
])
def test_bad_options_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})
