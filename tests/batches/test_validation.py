"""The parameters a batch is created with, checked on plain values (the input file's checks run e2e)."""

from __future__ import annotations

import pytest

from app.batches.validation import Parameters, check_parameters
from app.errors import InvalidRequest

WINDOWS = {"24h": 86400.0, "1h": 3600.0}
GOOD = {"endpoint": "/v1/chat/completions", "window": "1h", "input_file_id": "file-1", "metadata": {"job": "x"}}


def test_good_parameters_come_back_checked() -> None:
    checked = check_parameters(windows=WINDOWS, **GOOD)
    assert checked == Parameters("file-1", "/v1/chat/completions", "1h", {"job": "x"})
    assert check_parameters(windows=WINDOWS, **{**GOOD, "metadata": None}).metadata is None


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"endpoint": "/v1/images"}, "endpoint"),
        ({"endpoint": 3}, "endpoint"),
        ({"window": "2h"}, "completion_window"),
        ({"window": None}, "completion_window"),
        ({"input_file_id": ""}, "input_file_id"),
        ({"input_file_id": 7}, "input_file_id"),
        ({"metadata": ["a"]}, "metadata"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
    ],
)
def test_each_bad_parameter_is_a_400_naming_it(change: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_parameters(windows=WINDOWS, **{**GOOD, **change})
    assert refused.value.status_code == 400
    assert refused.value.body()["error"]["param"] == param
    if param == "completion_window":
        assert "'24h', '1h'" in refused.value.body()["error"]["message"]
