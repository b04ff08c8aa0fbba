"""The paired trainloop's model and its steps: what ``python -m ckptctl.trainloop`` trains.

A small convolutional "agent" turns ARC input grids into output grids; a critic, a learnable
loss and a frozen encoder make the saved state look like a real project's (several modules,
one of them never trained). :func:`train_step` and :func:`validate` draw random numbers only
from the global torch RNG (dropout), which every checkpoint saves, so a resumed run repeats
an uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ckptctl.arcdata import CHANNELS, COLOURS, IGNORE, PairSet


class FrozenEncoder(nn.Module):
    """A fixed random 1x1 projection of the one-hot grid. Never trained (``requires_grad=False``),
    saved under its own name so unchanged weights can be stored once."""

    def __init__(self, features: int = 16):
        super().__init__()
        self.proj = nn.Conv2d(CHANNELS, features, kernel_size=1, bias=False)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


class Agent(nn.Module):
    """Predicts the output grid's colours per cell. A learnable "copy gain" adds the input's
    one-hot to the logits, so an untrained agent starts near the copy-the-input baseline."""

    def __init__(self, features: int = 16, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(CHANNELS + features, hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(hidden, COLOURS, kernel_size=1)
        self.copy_gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv1(torch.cat([x, features], dim=1)))
        h = self.drop(F.relu(self.conv2(h)))
        logits = self.head(h) + self.copy_gain * x[:, :COLOURS]
        return logits, h


class Critic(nn.Module):
    """Second trainable module: predicts each sample's reward from the agent's pooled features."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.mean(dim=(2, 3))).squeeze(1)


class UncertaintyLoss(nn.Module):
    """Learnable loss: weighs the cell loss and the critic loss by learned uncertainties
    (``exp(-s) * L + s`` per term, Kendall et al. 2018)."""

    def __init__(self, terms: int = 2):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(terms))

    def forward(self, *losses: torch.Tensor) -> torch.Tensor:
        total = losses[0].new_zeros(())
        for i, term in enumerate(losses):
            total = total + torch.exp(-self.log_vars[i]) * term + self.log_vars[i]
        return total


@dataclass(frozen=True)
class StepModules:
    """The trained modules as :func:`train_step` calls them: the components themselves, or their DDP wrappers."""

    agent: nn.Module
    critic: nn.Module
    loss_fn: nn.Module


class Components:
    """Everything that is saved, by name: ``agent``, ``critic``, ``loss_fn``, ``encoder`` (frozen),
    ``optimizer``, ``scheduler``.

    ``wrap`` (under torchrun, see :mod:`ckptctl.train_parallel`) is applied to each trained
    module before the optimizer is built: it returns a DDP wrapper (the component stays the
    plain module, saved under its name) or shards the module in place (FSDP2). The frozen
    encoder is never wrapped: every rank holds the same copy.
    """

    def __init__(self, seed: int, lr: float, total_steps: int, device: torch.device,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        torch.manual_seed(seed)
        self.encoder = FrozenEncoder().to(device)
        self.agent = Agent().to(device)
        self.critic = Critic().to(device)
        self.loss_fn = UncertaintyLoss().to(device)
        wrap = wrap or (lambda module: module)
        self.step = StepModules(wrap(self.agent), wrap(self.critic), wrap(self.loss_fn))
        params = list(self.agent.parameters()) + list(self.critic.parameters()) + list(self.loss_fn.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, total_steps), eta_min=lr * 0.05
        )

    def adapt_schedule(self, lr: float, total_steps: int) -> list[str]:
        """After a resume, apply a changed ``--lr`` or run length to the restored schedule; say what changed.

        Loading the optimizer and scheduler restores the rate and length the checkpoint was
        trained with (read from the scheduler itself, not from the flags of the last attempt,
        which may have been killed before it saved). A new ``--lr`` scales the rate from here
        on (same cosine shape); a new length (``--epochs``, or a different data layout)
        stretches the cosine so it still ends at ``total_steps``.
        """
        notes = []
        scheduler, total_steps = self.scheduler, max(1, total_steps)
        saved_lr = scheduler.base_lrs[0]
        if not math.isclose(saved_lr, lr, rel_tol=1e-9):
            ratio = lr / saved_lr
            for group in self.optimizer.param_groups:
                group["lr"] *= ratio
                group["initial_lr"] = group.get("initial_lr", saved_lr) * ratio
            scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]
            scheduler.eta_min *= ratio
            scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            notes.append(f"lr was {saved_lr:g}, now {lr:g}: the learning-rate schedule continues, scaled to the new rate")
        if scheduler.T_max != total_steps:
            notes.append(f"the schedule was {scheduler.T_max} batches long, now {total_steps}: it is stretched to end there")
            scheduler.T_max = total_steps
        return notes

    def misfits(self) -> list[str]:
        """Trained parameters whose loaded optimizer state has another shape, as ``name: ...`` lines.

        None after a normal load; a checkpoint of another layout (``--parallel fsdp`` saves the
        agent's ``copy_gain`` as a one-element vector) can load without an error and fail only at
        the next step.
        """
        found = []
        for module_name, module in (("agent", self.agent), ("critic", self.critic), ("loss_fn", self.loss_fn)):
            for name, param in module.named_parameters():
                for key, value in self.optimizer.state.get(param, {}).items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                        found.append(f"{module_name}.{name}: parameter {tuple(param.shape)}, optimizer {key} {tuple(value.shape)}")
        return found

    def as_dict(self) -> dict[str, Any]:
        """The components by the names every checkpoint saves them under."""
        return {
            "agent": self.agent,
            "critic": self.critic,
            "loss_fn": self.loss_fn,
            "encoder": self.encoder,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
        }

    def train(self, mode: bool = True) -> None:
        """Train (or eval) mode for the trained modules; the frozen encoder stays in eval mode."""
        for module in (self.agent, self.critic, self.loss_fn):
            module.train(mode)
        self.encoder.eval()



def cell_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (correct cells, valid cells) as float tensors."""
    valid = targets != IGNORE
    correct = (logits.argmax(dim=1) == targets) & valid
    return correct.flatten(1).sum(1).to(torch.float32), valid.flatten(1).sum(1).to(torch.float32)


def copy_correct(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cells that copying the input would get right (the baseline of the reward)."""
    return ((inputs == targets) & (targets != IGNORE)).flatten(1).sum(1).to(torch.float32)


def train_step(c: Components, train: PairSet, index: torch.Tensor, device: torch.device) -> dict[str, float]:
    """One optimisation step on the samples at ``index``; returns loss and reward."""
    x = train.one_hot(index).to(device)
    targets = train.targets[index].to(device)
    with torch.no_grad():
        features = c.encoder(x)
    logits, hidden = c.step.agent(x, features)
    cell_loss = F.cross_entropy(logits, targets, ignore_index=IGNORE)
    with torch.no_grad():
        correct, valid = cell_accuracy(logits, targets)
        baseline = copy_correct(train.inputs[index].to(device), targets)
        per_sample_reward = (correct - baseline) / valid.clamp(min=1)
        reward = (correct.sum() - baseline.sum()) / valid.sum().clamp(min=1)
    value = c.step.critic(hidden.detach())
    critic_loss = F.mse_loss(value, per_sample_reward)
    loss = c.step.loss_fn(cell_loss, critic_loss)
    c.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    c.optimizer.step()
    c.scheduler.step()
    return {"loss": float(loss.item()), "reward": float(reward.item())}


@torch.no_grad()
def validate(c: Components, val: PairSet, baseline: float, device: torch.device, chunk: int = 128) -> dict[str, float]:
    """Cell accuracy on the held-out pairs (eval mode, no randomness) and its gain over copying."""
    if len(val) == 0:
        return {"accuracy": math.nan, "accuracy_delta": math.nan}
    c.train(False)
    correct = valid = 0.0
    for start in range(0, len(val), chunk):
        index = torch.arange(start, min(start + chunk, len(val)))
        x = val.one_hot(index).to(device)
        logits, _ = c.agent(x, c.encoder(x))
        a, b = cell_accuracy(logits, val.targets[index].to(device))
        correct += float(a.sum())
        valid += float(b.sum())
    c.train(True)
    accuracy = correct / max(1.0, valid)
    return {"accuracy": accuracy, "accuracy_delta": accuracy - baseline}

