import pytest
import torch

from omni.sampling import GenerationConfig, _top_p_filter, sample


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


# Probabilities 0.4, 0.3 and three of 0.1: top_p=0.6 keeps the smallest set holding 60 %, tokens 0 and 1.
NUCLEUS_PROBS = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1]])


def test_top_p_masks_exactly_the_tail():
    filtered = _top_p_filter(NUCLEUS_PROBS.log(), 0.6)
    assert torch.isfinite(filtered).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(_top_p_filter(NUCLEUS_PROBS.log(), 1.0)).all()


def test_top_p_samples_only_the_nucleus():
    # Without the filter, 1,000 draws miss tokens 2-4 (30 % of the mass) with probability 0.7 ** 1000.
    cfg = GenerationConfig(top_k=None, top_p=0.6, temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    drawn = [int(sample(NUCLEUS_PROBS.log(), cfg, gen)[0]) for _ in range(1000)]
    assert set(drawn) == {0, 1}
    assert 0.5 < drawn.count(0) / len(drawn) < 0.64  # renormalised: 0.4 / 0.7 = 0.57


def test_sampling_is_deterministic_under_a_generator_and_leaves_the_global_rng_alone():
    logits = torch.randn(3, 100)
    cfg = GenerationConfig(top_k=None, temperature=1.0)
    state = torch.get_rng_state()
    a = sample(logits, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample(logits, cfg, torch.Generator().manual_seed(7)))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("top_k", 0), ("top_k", 1.5), ("top_p", 0.0), ("top_p", 1.5),
    ("max_tokens", 1), ("stream_stride", 0), ("first_stride", 0), ("temperature", "hot"),
])
def test_bad_options_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})
