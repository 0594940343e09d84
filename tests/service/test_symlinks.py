"""Repository files are read only when they resolve inside the repository, unless `follow_symlinks` is set;
a refused link is a load error whose reason names no target, and a linked file's content never reaches a
client."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import orjson
import pytest

from service.app import create_app
from tests.service.conftest import InProcess, frozen_model, frozen_params
from tests.service.conftest import test_settings as settings_for

MARKER = "s3cr3t-outside-the-repository"
BODY = orjson.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """`repo/` with `inside/1/model.onnx` (a real file), and `outside/` beside it holding a model and a
    secret file; tests add the links."""
    root, outside = tmp_path / "repo", tmp_path / f"outside-{MARKER}"
    (root / "inside" / "1").mkdir(parents=True)
    onnx.save(frozen_model(frozen_params(1)), root / "inside" / "1" / "model.onnx")
    outside.mkdir()
    onnx.save(frozen_model(frozen_params(2)), outside / "model.onnx")
    (outside / "config.json").write_text(f'{{"{MARKER}": "{MARKER}"}}')
    return root, outside


def _serve(root: Path, **overrides: Any) -> Iterator[InProcess]:
    server = InProcess(create_app(settings_for(root, **overrides)))
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def test_a_model_file_linked_from_outside_is_refused_with_a_reason_naming_no_target(
    layout: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root, outside = layout
    (root / "linked" / "1").mkdir(parents=True)
    (root / "linked" / "1" / "model.onnx").symlink_to(outside / "model.onnx")
    (root / "linked_dir").symlink_to(outside.parent / outside.name, target_is_directory=True)
    (outside / "1").mkdir()
    (outside / "1" / "model.onnx").symlink_to(outside / "model.onnx")
    with caplog.at_level(logging.INFO, logger="bn_serve"):
        for server in _serve(root):
            for name in ("linked", "linked_dir"):
                response = server.post(f"/v2/models/{name}/infer", content=BODY)
                assert response.status_code == 503, response.text
                assert "symbolic link" in response.json()["error"]
                assert MARKER not in response.text
                ready = server.get(f"/v2/models/{name}/ready")
                assert ready.status_code == 503
                assert MARKER not in ready.text
            assert server.post("/v2/models/inside/infer", content=BODY).status_code == 200
            index = server.post("/v2/repository/index", content=b"{}")
            assert MARKER not in index.text
    assert MARKER not in caplog.text


def test_links_that_stay_inside_the_repository_are_followed(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    (root / "alias").symlink_to(root / "inside", target_is_directory=True)
    for server in _serve(root):
        assert server.post("/v2/models/alias/infer", content=BODY).status_code == 200


def test_follow_symlinks_reads_linked_files(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "linked" / "1").mkdir(parents=True)
    (root / "linked" / "1" / "model.onnx").symlink_to(outside / "model.onnx")
    for server in _serve(root, follow_symlinks=True):
        assert server.post("/v2/models/linked/infer", content=BODY).status_code == 200


@pytest.mark.parametrize("follow", [False, True])
def test_a_config_json_linked_from_outside_never_reaches_a_client_or_log(
    layout: tuple[Path, Path], caplog: pytest.LogCaptureFixture, follow: bool
) -> None:
    root, outside = layout
    (root / "inside" / "config.json").symlink_to(outside / "config.json")
    # A second model serves, so the server turns ready while `inside` is refused at load.
    (root / "plain" / "1").mkdir(parents=True)
    onnx.save(frozen_model(frozen_params(3)), root / "plain" / "1" / "model.onnx")
    with caplog.at_level(logging.INFO, logger="bn_serve"):
        for server in _serve(root, follow_symlinks=follow):
            response = server.post("/v2/models/inside/infer", content=BODY)
            assert response.status_code >= 400
            assert MARKER not in response.text
            ready = server.get("/v2/models/inside/ready")
            assert ready.status_code == 503
            assert "config.json" in ready.text
            assert MARKER not in ready.text
            load = server.post("/v2/repository/models/inside/load")
            assert MARKER not in load.text
    assert MARKER not in caplog.text
