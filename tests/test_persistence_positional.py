"""Components passed positionally to resume / load_checkpoint / load_best_model, as the Colab guide calls them.

Real modules and optimizers, real files: runs written by ModelPersistence, a checkpoint as
ckptctl's first version wrote it (no recorded order), and the guide's own plain
``torch.save`` runs (``tests/test_legacy_runs.py``).
"""

from __future__ import annotations

import io
import logging

import pytest
import torch

from ckptctl import ModelPersistence
from ckptctl.errors import CkptctlError, DeviceUnavailableError
from ckptctl.tensors import compare_states, map_nested
from ckptctl.torch_io import safe_load

from .damage import replace_indexed_file
from .runs import ckpt
from .test_legacy_runs import POSITIONS, GuideModels, write_guide_run


def _differs(a: dict, b: dict) -> list[str]:
    return [r.name for r in compare_states(a, b) if not r.bit_identical]


def _states(models: dict) -> dict:
    return {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in m.state_dict().items()} for name, m in models.items()}


def _guide_components(g: GuideModels) -> tuple:
    """The guide's call order: agent, qwen, solver2, efe_loss, policy_rl, optimizer."""
    return (g.agent, g.qwen, g.solver2, g.efe_loss, g.policy_rl, g.optimizer)


def _write_unsorted_run(run, n: int = 2, seed: int = 0) -> GuideModels:
    """A ckptctl run of the guide's models saved by keyword in the guide's (unsorted) order; returns the final models."""
    g = GuideModels(seed)
    with ModelPersistence(run, save_every_n_batches=1, background=False) as p:
        for step in range(n):
            g.step()
            named = dict(zip(("agent", "qwen", "solver2", "efe_loss", "policy_rl", "optimizer"), _guide_components(g)))
            p.maybe_save(0, step, {"accuracy_delta": float(step)}, **named)
            p.update_best(0, step, {"accuracy_delta": float(step)}, **named)
    return g


# ---------------------------------------------------------------------- the guide's calls on the guide's runs


def test_the_guides_positional_calls_load_the_guides_own_files(tmp_path):
    run, _, final = write_guide_run(tmp_path)
    with ModelPersistence(run, background=False) as p:
        g = GuideModels(seed=99)
        if not torch.cuda.is_available():  # the guide's exact call: the device is the one problem, said before any read
            with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
                p.load_best_model(g.agent, g.qwen, g.solver2, g.efe_loss, g.policy_rl, g.optimizer, device="cuda")
        meta = p.load_best_model(g.agent, g.qwen, g.solver2, g.efe_loss, g.policy_rl, g.optimizer, device="cpu")
        assert (meta["epoch"], meta["batch"]) == POSITIONS[1]
        assert _differs(g.agent.state_dict(), final["best_agent"]) == []
        assert g.optimizer.state_dict()["state"]  # the optimizer came back too, bound by position

        previous_id = 2
        g = GuideModels(seed=98)
        meta = p.load_checkpoint(previous_id, g.agent, g.qwen, g.solver2, g.efe_loss, g.policy_rl, g.optimizer)
        assert (meta["epoch"], meta["batch"]) == POSITIONS[2]
        for name, module in g.modules().items():
            assert _differs(module.state_dict(), final[name]) == [], name

        g = GuideModels(seed=97)
        info = p.resume(g.agent, g.qwen, g.solver2, g.efe_loss, g.policy_rl, g.optimizer)
        assert info["checkpoint_id"] == 2
        for name, module in g.modules().items():
            assert _differs(module.state_dict(), final[name]) == [], name


def test_one_module_by_position_is_a_clear_type_error_not_a_damaged_file(tmp_path, caplog):
    run, _, _ = write_guide_run(tmp_path)
    g = GuideModels(seed=5)
    before = _states(g.modules())
    caplog.set_level(logging.WARNING, logger="ckptctl")
    with ModelPersistence(run, background=False) as p:
        with pytest.raises(TypeError) as exc:
            p.load_best_model(g.agent)
        message = str(exc.value)
        assert "load_best_model() got 1 component(s) by position" in message
        assert "Sequential" in message  # what was passed
        assert "agent, qwen, solver2, efe_loss, policy_rl, optimizer" in message  # what was saved, in order
        assert "cannot load" not in message and "forward()" not in message
        with pytest.raises(TypeError, match=r"resume\(\) got 1 component\(s\) by position"):
            p.resume(g.agent)
        for name, module in g.modules().items():  # the refused calls loaded nothing
            assert _differs(module.state_dict(), before[name]) == [], name
        assert p.resume(g.agent, g.qwen, g.solver2, g.efe_loss, g.policy_rl, g.optimizer)["checkpoint_id"] == 2
    assert not [r for r in caplog.records if "skipping checkpoint" in r.getMessage()]


# ---------------------------------------------------------------------- ckptctl's own runs


def test_positional_components_bind_in_the_order_they_were_saved_not_sorted(tmp_path):
    run = tmp_path / "r"
    saved = _write_unsorted_run(run)
    payload = torch.load(ckpt(run, 1), weights_only=True)
    assert payload["component_order"] == ["agent", "qwen", "solver2", "efe_loss", "policy_rl", "optimizer"]
    assert payload["components"] == sorted(payload["component_order"])  # kept sorted, as before
    with ModelPersistence(run, background=False) as p:
        g = GuideModels(seed=42)
        assert p.resume(*_guide_components(g))["checkpoint_id"] == 1
        for name, module in g.modules().items():
            assert _differs(module.state_dict(), saved.modules()[name].state_dict()) == [], name
        g = GuideModels(seed=43)
        p.load_best_model(*_guide_components(g))
        assert _differs(g.qwen.state_dict(), saved.qwen.state_dict()) == []


def test_a_first_version_checkpoint_without_a_recorded_order_binds_in_its_save_order(tmp_path):
    """ckptctl's first files list their components sorted; the file's key order is the order they were saved in."""
    run = tmp_path / "r"
    saved = _write_unsorted_run(run)
    resolved = map_nested(safe_load(ckpt(run, 1)), lambda v, _: (True, v.clone()) if torch.is_tensor(v) else (False, None))
    payload = {k: v for k, v in resolved.items() if k not in ("component_order", "objects")}
    payload["format_version"] = 1  # the whole payload in one file, its components listed sorted
    assert payload["components"] == sorted(payload["components"]) != list(payload)[-6:]
    buf = io.BytesIO()
    torch.save(payload, buf)
    replace_indexed_file(run, 1, buf.getvalue())
    with ModelPersistence(run, background=False) as p:
        g = GuideModels(seed=44)
        assert p.resume(*_guide_components(g))["checkpoint_id"] == 1
        for name, module in g.modules().items():
            assert _differs(module.state_dict(), saved.modules()[name].state_dict()) == [], name


def test_positional_and_keyword_components_mix_when_no_name_is_bound_twice(tmp_path):
    run = tmp_path / "r"
    saved = _write_unsorted_run(run)
    with ModelPersistence(run, background=False) as p:
        g = GuideModels(seed=45)
        p.load_checkpoint(1, g.agent, g.qwen, optimizer=g.optimizer, solver2=g.solver2, efe_loss=g.efe_loss, policy_rl=g.policy_rl)
        for name, module in g.modules().items():
            assert _differs(module.state_dict(), saved.modules()[name].state_dict()) == [], name
        with pytest.raises(TypeError, match=r"got component 'agent' twice, by position and by name"):
            p.load_checkpoint(1, g.qwen, agent=g.agent, solver2=g.solver2, efe_loss=g.efe_loss, policy_rl=g.policy_rl, optimizer=g.optimizer)
        with pytest.raises(TypeError, match=r"got 7 component\(s\) by position, but the checkpoint saved 6, so 6 by position"):
            p.resume(*_guide_components(g), torch.nn.Linear(1, 1))
        with pytest.raises(TypeError, match=r"saved 6 \(1 more by name: optimizer\), so 5 by position are expected"):
            p.resume(g.agent, g.qwen, optimizer=g.optimizer)
        p.load_checkpoint(0, agent=g.agent)  # keyword only: a subset, as always


# ---------------------------------------------------------------------- the device


def test_anything_but_a_device_where_the_device_goes_is_a_type_error_before_any_file_is_read(tmp_path, caplog):
    run = tmp_path / "r"
    _write_unsorted_run(run)
    for checkpoint_id in (0, 1):
        ckpt(run, checkpoint_id).write_bytes(b"not a checkpoint")  # any read would call these damaged
    (run / "best_model.pt").write_bytes(b"not a checkpoint")
    caplog.set_level(logging.WARNING, logger="ckptctl")
    g = GuideModels(seed=46)
    with ModelPersistence(run, background=False) as p:
        for call in (
            lambda: p.resume(device=g.agent, agent=g.agent),
            lambda: p.load_best_model(device=g.optimizer),
            lambda: p.load_checkpoint(1, g.agent, device=[0]),
        ):
            with pytest.raises(TypeError, match=r"device must be a device name .* not a (Sequential|Adam|list)") as exc:
                call()
            assert not isinstance(exc.value, CkptctlError)
        with pytest.raises(TypeError, match=r"resume\(\) positional argument 2 is 'cuda', not a component"):
            p.resume(g.agent, "cuda")
        with pytest.raises(TypeError, match=r"got the device twice"):
            p.resume("cpu", device="cpu", agent=g.agent)
    assert not [r for r in caplog.records if "skipping checkpoint" in r.getMessage()]


def test_the_old_positional_device_and_a_none_device_still_load(tmp_path):
    run = tmp_path / "r"
    saved = _write_unsorted_run(run)
    with ModelPersistence(run, background=False) as p:
        g = GuideModels(seed=47)
        assert p.resume("cpu", agent=g.agent)["checkpoint_id"] == 1
        assert _differs(g.agent.state_dict(), saved.agent.state_dict()) == []
        assert p.load_checkpoint(0, torch.device("cpu"), agent=g.agent)["checkpoint_id"] == 0
        g = GuideModels(seed=48)
        p.load_best_model(device=None, qwen=g.qwen)
        assert _differs(g.qwen.state_dict(), saved.qwen.state_dict()) == []
