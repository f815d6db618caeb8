import pytest

from moon.errors import ConfigError
from moon.regions import coordinate_frame, extract_raw_box, parse_grounding_answer

# answers as Qwen-VL models write them (recorded shapes), the malformed ones included
JSON_FENCED = '```json\n[\n\t{"bbox_2d": [120, 56, 340, 410], "label": "red sneaker"}\n]\n```'
JSON_PROSE = 'Sure! The product is here: {"bbox_2d": [10, 20, 30, 40], "label": "cup"} Hope this helps.'
JSON_BBOX_KEY = '{"bbox": [1.5, 2.5, 50.25, 60]}'
BOX_TOKENS = "<|object_ref_start|>the shoe<|object_ref_end|><|box_start|>(250,100),(750,900)<|box_end|>"
BARE_LIST = "The box is [5, 6, 70, 80]."


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (JSON_FENCED, [120, 56, 340, 410]),
        (JSON_PROSE, [10, 20, 30, 40]),
        (JSON_BBOX_KEY, [1.5, 2.5, 50.25, 60]),
        (BOX_TOKENS, [250, 100, 750, 900]),
        (BARE_LIST, [5, 6, 70, 80]),
        ('[{"label": "a"}, {"bbox_2d": [1, 2, 3, 4]}]', [1, 2, 3, 4]),
    ],
)
def test_extract_raw_box_known_answers(answer, expected):
    assert extract_raw_box(answer) == expected


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "I cannot find the product in this image.",
        '```json\n[{"bbox_2d": [120, 56, 340]}]\n```',  # three numbers
        '{"bbox_2d": ["a", "b", "c", "d"]}',
        '[{"bbox_2d": [12, 34, 56',  # truncated generation
        "<|box_start|>(250,100),(750<|box_end|>",
        '{"bbox_2d": [NaN, 1, 2, 3]}',
        "!!!!!!!!黑色运动鞋",
    ],
)
def test_malformed_answers_give_none(answer):
    assert parse_grounding_answer(answer, (400, 300)) is None


def test_absolute_frame_scales_from_model_input_to_original():
    # the model saw 448×336, the original is 896×672: boxes double
    box = parse_grounding_answer(JSON_PROSE, (896, 672), frame="qwen2.5-vl", input_size=(448, 336))
    assert box == (20.0, 40.0, 60.0, 80.0)


def test_relative_frame_is_thousandths_of_the_image():
    box = parse_grounding_answer(BOX_TOKENS, (400, 200), frame="qwen2-vl")
    assert box == pytest.approx((100.0, 20.0, 300.0, 180.0))


def test_boxes_are_clamped_and_invalid_ones_rejected():
    assert parse_grounding_answer('{"bbox_2d": [-20, -5, 90, 500]}', (100, 80)) == (0.0, 0.0, 90.0, 80.0)
    assert parse_grounding_answer('{"bbox_2d": [50, 50, 10, 90]}', (100, 100)) is None  # inverted
    assert parse_grounding_answer('{"bbox_2d": [150, 150, 190, 190]}', (100, 100)) is None  # outside
    assert parse_grounding_answer('{"bbox_2d": [10, 10, 10.5, 40]}', (100, 100)) is None  # sliver


def test_coordinate_frames_by_family():
    assert coordinate_frame("qwen2.5-vl") == "absolute"
    assert coordinate_frame("Qwen2-VL") == "relative1000"
    assert coordinate_frame("qwen3-vl") == "relative1000"
    with pytest.raises(ConfigError):
        coordinate_frame("llava")
