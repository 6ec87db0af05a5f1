"""`retrac index delete`, and what every other command says of a store whose deletion was interrupted."""

from __future__ import annotations

from cli import main
from storage import GradientStore
from storage.store import mark_deleted
from tests.storage.helpers import tiny_index_spec


def test_a_store_marked_deleted_is_refused_in_one_line_and_delete_finishes_it(
    tiny_run, tmp_path, capsys
) -> None:
    path = tmp_path / "s.zarr"
    GradientStore.create(path, tiny_index_spec(tiny_run))
    mark_deleted(path)  # what a deletion killed before its rename leaves
    capsys.readouterr()
    for command in (
        ["index", "status", str(path)],
        ["index", "run", str(path)],
        ["index", "inspect", str(path)],
    ):
        assert main(command) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, command
        assert "being deleted" in lines[0], command
        assert "retrac index delete" in lines[0], command
    assert (path / "checkpoints").is_dir()  # `index run` wrote nothing

    assert main(["index", "delete", str(path)]) == 0
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # nothing set aside is left either


def test_delete_removes_only_stores(tiny_run, tmp_path, capsys) -> None:
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "keep.png").write_bytes(b"not a store")
    assert main(["index", "delete", str(plain)]) == 2
    assert "nothing deleted" in capsys.readouterr().err
    assert (plain / "keep.png").is_file()

    path = tmp_path / "s.zarr"
    GradientStore.create(path, tiny_index_spec(tiny_run))
    assert main(["index", "delete", str(path)]) == 0
    assert not path.exists()
