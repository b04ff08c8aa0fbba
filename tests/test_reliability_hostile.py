"""Hostile input at the library level: absurd archive sizes, pathological JSON, odd file names."""

from __future__ import annotations

import os
import resource
import zipfile

import pytest
import torch

from ckptctl import ModelPersistence
from ckptctl.core.format import INDEX_FILE
from ckptctl.errors import CheckpointIntegrityError, CorruptIndexError
from ckptctl.storage.scan import MAX_METADATA_BYTES, read_index, scan_run
from ckptctl.torch_io import safe_load


def _absurd_size_archive(path):
    """A real torch archive whose pickle claims a ~4.8 GB storage backed by 40 bytes."""
    torch.save({"w": torch.zeros(10)}, path.with_suffix(".orig"))
    src = zipfile.ZipFile(path.with_suffix(".orig"))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as out:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(b"K\x00K\n\x85", b"K\x00J\x00\xe8\x76\x48\x85")  # tensor size
                cut = data.index(b"cpu")
                data = data[:cut] + data[cut:].replace(b"K\n", b"J\x00\xe8\x76\x48", 1)  # storage numel
            out.writestr(name, data)


@pytest.mark.parametrize("mmap", [True, False])
def test_absurd_sizes_in_the_archive_are_corrupt_not_an_allocation(tmp_path, mmap):
    bomb = tmp_path / "bomb.pt"
    _absurd_size_archive(bomb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointIntegrityError) as err:
        safe_load(bomb, mmap=mmap)
    assert err.value.status == "corrupt"
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024  # nowhere near the 4.8 GB claimed


def test_deeply_nested_and_huge_json_are_refused(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / INDEX_FILE).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CorruptIndexError):
        read_index(run)
    with open(run / INDEX_FILE, "wb") as f:
        f.truncate(MAX_METADATA_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(CorruptIndexError, match="limit"):
        read_index(run)
    scan = scan_run(run)
    assert scan.index is None and "limit" in scan.problems[0]


def test_non_utf8_and_odd_names_in_a_run_are_ignored(tmp_path):
    run = tmp_path / "r"
    with ModelPersistence(run, save_every_n_batches=1) as p:
        p.save_checkpoint(0, 0, {}, agent=torch.nn.Linear(2, 2))
    folder = os.fsencode(run / "checkpoints")
    for name in (b"checkpoint_\xff\xfe.pt", b"\xff\xfe.pt", b"checkpoint_00001.pt\xff"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"junk")
    with ModelPersistence(run) as p:
        assert sorted(p.checkpoints) == [0]
        assert p.resume(agent=torch.nn.Linear(2, 2))["checkpoint_id"] == 0
    assert len(os.listdir(folder)) == 4  # nothing deleted


def test_a_run_with_a_non_utf8_name_works_with_every_command(tmp_path):
    """torch opens files by UTF-8 name: such a run is reached another way, not reported corrupt."""
    from typer.testing import CliRunner

    from ckptctl.cli import app

    runner = CliRunner()
    run = os.fsdecode(os.fsencode(tmp_path / "runs") + b"/run_\xff")
    with ModelPersistence(run, save_every_n_batches=1) as p:
        p.save_checkpoint(0, 0, {"loss": 1.0}, agent=torch.nn.Linear(2, 2))
    with ModelPersistence(run) as p:
        assert p.resume(agent=torch.nn.Linear(2, 2))["checkpoint_id"] == 0
    for args, code in ((["verify", str(tmp_path / "runs")], 0), (["resume-info", run], 0), (["show", run], 0), (["ls", str(tmp_path / "runs")], 0)):
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)


def test_a_symlinked_checkpoints_folder_is_never_read_or_deleted(tmp_path):
    from typer.testing import CliRunner

    from ckptctl.cli import app

    outside = tmp_path / "elsewhere"
    with ModelPersistence(outside, save_every_n_batches=1) as p:
        for batch in range(3):
            p.save_checkpoint(0, batch, {}, agent=torch.nn.Linear(2, 2))
    run = tmp_path / "runs" / "hostile"
    run.mkdir(parents=True)
    (run / "checkpoints").symlink_to(outside / "checkpoints", target_is_directory=True)
    (run / INDEX_FILE).write_bytes((outside / INDEX_FILE).read_bytes())
    before = sorted(os.listdir(outside / "checkpoints"))
    result = CliRunner().invoke(app, ["verify", str(run), "--json"])
    assert result.exit_code == 1
    import json

    statuses = {r["status"] for r in json.loads(result.stdout)["results"]}
    assert statuses == {"corrupt"}, result.stdout  # every entry resolves outside the run: not read
    CliRunner().invoke(app, ["prune", str(run), "--keep", "1", "--yes"])
    assert sorted(os.listdir(outside / "checkpoints")) == before
