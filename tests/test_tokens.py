import pytest

from omni.tokens import (
    ANSWER_A, ANSWER_T, ASR_T, EOA, EOT, INPUT_A, INPUT_T, PAD_A, PAD_T, PADDED_VOCAB, Task, audio_id,
    audio_logit_slice, build_prompt,
)


def test_special_ids_match_the_spec():
    assert (EOT, PAD_T, INPUT_T, ANSWER_T, ASR_T) == (151936, 151937, 151938, 151939, 151940)
    assert (EOA, PAD_A, INPUT_A, ANSWER_A) == (4096, 4097, 4098, 4099)
    assert PADDED_VOCAB == 181120 == 152000 + 7 * 4160


def test_audio_ids_tile_the_vocabulary():
    assert audio_id(0, 0) == 152000
    assert audio_id(4159, 6) == PADDED_VOCAB - 1
    assert audio_id(PAD_A, 3) == 4097 + 152000 + 3 * 4160  # the official layershift(4097, 3)
    for layer in range(7):
        s = audio_logit_slice(layer)
        assert s.stop - s.start == 4160 and s.start == audio_id(0, layer)


def _rows(prompt):
    return [row.tolist() for row in prompt]


@pytest.mark.parametrize("task, a_last, t_last", [
    (Task.A1A2, ANSWER_A, ANSWER_T), (Task.A1T2, PAD_A, ANSWER_T), (Task.ASR, PAD_A, ASR_T),
])
def test_audio_prompt_layout(task, a_last, t_last):
    L = 98  # output1.wav of the official repo: 1.941 s
    rows = _rows(build_prompt(task, n_audio_frames=L))
    assert all(len(r) == L + 3 for r in rows)
    for layer in range(7):
        assert rows[layer] == [audio_id(x, layer) for x in [INPUT_A] + [PAD_A] * L + [EOA, a_last]]
    assert rows[7] == [INPUT_T] + [PAD_T] * L + [EOT, t_last]


@pytest.mark.parametrize("task, a_rows, t_last", [
    (Task.T1A2, lambda n: [PAD_A] * (n + 2) + [ANSWER_A], ANSWER_T),
    (Task.T1T2, lambda n: [PAD_A] * (n + 3), ANSWER_T),
])
def test_text_prompt_layout(task, a_rows, t_last):
    ids = [11, 22, 33, 44]
    rows = _rows(build_prompt(task, text_ids=ids))
    for layer in range(7):
        assert rows[layer] == [audio_id(x, layer) for x in a_rows(len(ids))]
    assert rows[7] == [INPUT_T, *ids, EOT, t_last]


def test_prompt_needs_its_input():
    with pytest.raises(ValueError, match="audio features"):
        build_prompt(Task.A1A2, n_audio_frames=0)
    with pytest.raises(ValueError, match="text prompt"):
        build_prompt(Task.T1T2, text_ids=[])
