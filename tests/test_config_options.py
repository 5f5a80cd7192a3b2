"""config_from_options: string options (``--set key=value``) typed by each field's default, default_factory included."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from streamrec.errors import UserError
from training.models.base import config_from_options


@dataclass
class Example:
    epochs: int = 10
    lr: float = 0.1
    loss: str = "ce"
    shuffle: bool = True
    layers: tuple[int, ...] = (100,)
    widths: list[int] = field(default_factory=lambda: [64, 32])
    weights: dict[str, float] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


def test_plain_defaults_type_their_options():
    config = config_from_options(Example, {"epochs": "3", "lr": "1e-3", "loss": "bpr", "shuffle": "no", "layers": "[32, 16]"})
    assert config == Example(epochs=3, lr=1e-3, loss="bpr", shuffle=False, layers=(32, 16))


def test_default_factory_fields_are_parsed_like_their_default():
    config = config_from_options(Example, {"widths": "[8, 4, 2]", "weights": '{"a": 0.5}', "tags": '["x"]'})
    assert config.widths == [8, 4, 2]
    assert config.weights == {"a": 0.5}
    assert config.tags == ["x"]
    assert config_from_options(Example, {"widths": "8"}).widths == [8]  # a lone value is a list of one
    assert config_from_options(Example, {}).widths == [64, 32]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"weights": "[1, 2]"}, "setting 'weights' wants a dict, got '[1, 2]'"),
        ({"widths": "[8,"}, "setting 'widths' wants a list, got '[8,'"),
        ({"epochs": "ten"}, "setting 'epochs' wants a int, got 'ten'"),
        ({"depth": "2"}, "unknown setting 'depth'"),
    ],
)
def test_bad_options_are_one_line_user_errors(options, message):
    with pytest.raises(UserError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        config_from_options(Example, options)
