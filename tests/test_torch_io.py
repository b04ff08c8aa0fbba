"""Torch IO fast paths give the same tensors as the plain ones; safe loading refuses pickled code."""

from __future__ import annotations

import os
import pickle
import threading
import zipfile

import pytest
import torch

from ckptctl.errors import CheckpointIntegrityError
from ckptctl.storage.atomic import hash_file
from ckptctl.tensors import find_nonfinite
from ckptctl.torch_io import Stager, build_payload, component_states, safe_load, verify_file, write_checkpoint_file


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 2))


def _payload(stager, model, opt):
    return build_payload(stager, checkpoint_id=0, epoch=0, batch=0, global_step=1, metrics={"loss": 1.0},
                         timestamp="t", states=component_states({"agent": model, "optimizer": opt}))


def test_staged_payload_equals_the_live_state_and_buffers_are_reused():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    stager = Stager()
    first = _payload(stager, model, opt)
    buffers_after_first = stager.staged_bytes
    for name, value in model.state_dict().items():
        assert torch.equal(first["agent"][name], value)
        assert first["agent"][name].data_ptr() != value.data_ptr()  # a copy, not a view
    with torch.no_grad():
        model[0].weight.add_(1.0)
    second = _payload(stager, model, opt)
    assert stager.staged_bytes == buffers_after_first  # no new allocation
    assert second["agent"]["0.weight"].data_ptr() == first["agent"]["0.weight"].data_ptr()
    assert torch.equal(second["agent"]["0.weight"], model[0].weight)
    assert second["agent"]._metadata == model.state_dict()._metadata  # BatchNorm version info kept


def test_fast_write_loads_like_plain_torch_save_and_restores_the_crc_option(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    payload = _payload(Stager(), model, opt)
    before = torch.serialization.get_crc32_options()
    size, checksum = write_checkpoint_file(tmp_path / "fast.pt", payload)
    assert torch.serialization.get_crc32_options() == before
    assert (size, checksum) == hash_file(tmp_path / "fast.pt")
    torch.save(payload, tmp_path / "plain.pt")
    fast = torch.load(tmp_path / "fast.pt", weights_only=True)
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    for name in plain["agent"]:
        assert torch.equal(fast["agent"][name], plain["agent"][name])
    assert fast["optimizer"]["param_groups"] == plain["optimizer"]["param_groups"]
    assert fast["metrics"] == plain["metrics"]



def _zip_crcs(path) -> dict[str, int]:
    with zipfile.ZipFile(path) as z:
        return {info.filename.split("/", 1)[1]: info.CRC for info in z.infolist()}


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"), reason="torch < 2.6 has no CRC option")
def test_the_fast_write_skips_the_zip_crc_in_the_thread_that_saves(tmp_path):
    """torch 2.13 keeps the CRC option per thread: the background worker's own save must turn it off."""
    payload = {"w": torch.arange(1000.0), "metrics": {"loss": 1.0}}
    worker = threading.Thread(target=write_checkpoint_file, args=(tmp_path / "fast.pt", payload))
    worker.start()
    worker.join()
    torch.save(payload, tmp_path / "plain.pt")
    fast, plain = _zip_crcs(tmp_path / "fast.pt"), _zip_crcs(tmp_path / "plain.pt")
    assert fast.keys() == plain.keys()
    assert set(fast.values()) == {0}  # no CRC computed
    assert 0 not in plain.values()  # a plain torch.save still computes it


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_reported_unsafe_and_never_runs(tmp_path):
    torch.save({"agent": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointIntegrityError) as err:
        safe_load(tmp_path / "evil.pt")
    assert err.value.status == "unsafe"
    with open(tmp_path / "legacy.pt", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointIntegrityError) as err:
        safe_load(tmp_path / "legacy.pt")
    assert err.value.status in ("unsafe", "corrupt")
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_verify_deep_finds_nonfinite_tensors(tmp_path):
    good = {"agent": {"w": torch.ones(3)}, "rng": {}}
    bad = {"agent": {"w": torch.tensor([1.0, float("nan")]), "i": torch.tensor([1])}}
    size, checksum = write_checkpoint_file(tmp_path / "good.pt", good)
    verify_file(tmp_path / "good.pt", checksum, deep=True)
    _, checksum = write_checkpoint_file(tmp_path / "bad.pt", bad)
    verify_file(tmp_path / "bad.pt", checksum)  # shallow verify passes
    with pytest.raises(CheckpointIntegrityError) as err:
        verify_file(tmp_path / "bad.pt", checksum, deep=True)
    assert err.value.status == "nonfinite" and "agent.w" in str(err.value)
    assert find_nonfinite(bad) == ["agent.w"]


def test_safe_load_refuses_a_fifo_and_a_symlink_to_one_without_blocking(tmp_path):
    from tests.cli_helpers import no_hang

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    (tmp_path / "link-good.pt").symlink_to(good)
    assert torch.equal(safe_load(tmp_path / "link-good.pt")["w"], torch.ones(2))  # a link to a regular file loads
    fifo = tmp_path / "checkpoint_00001.pt"
    os.mkfifo(fifo)
    (tmp_path / "link-fifo.pt").symlink_to(fifo)
    (tmp_path / "dir.pt").mkdir()
    with no_hang():
        for path in (fifo, tmp_path / "link-fifo.pt", tmp_path / "dir.pt"):
            for call in (lambda: safe_load(path), lambda: verify_file(path, None), lambda: verify_file(path, hash_file(good)[1])):
                with pytest.raises(CheckpointIntegrityError, match="not a regular file") as err:
                    call()
                assert err.value.status == "corrupt"
