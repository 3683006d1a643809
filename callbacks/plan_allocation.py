"""PLAN (Wang, Zhuang, Zhang, ICCV 2025): proactive low-rank allocation, as reconstructed from its abstract.

**This is a reconstruction, not the paper's method.** The paper's method section, equations and numbers were
not available (see ``shared/specs/cl_methods.md`` section 1.3); only its abstract was. The abstract's three
claims map onto three swappable components, each a constructor argument, so the published equations can
replace them one by one:

1. *Orthogonal basis vectors for each task* (``pool``): before the first task every layer gets a pool of
   orthonormal input directions (``random``: QR of a Gaussian; ``weight_minor``: the right singular vectors
   of the frozen weight with the smallest singular values; ``input_eigen``: the eigenvectors of the first
   task's input second moment). Each task's down-projection ``A_t`` is ``r`` orthonormal directions drawn
   from the pool's free part, kept orthogonal to the directions earlier tasks own and to the memory of old
   tasks' inputs, so tasks own mutually orthogonal subspaces.
2. *Selection of the basis vectors least sensitive to interference* (``selection``). A unit update along a
   free direction ``q`` moves a task's layer outputs by ``E[(q^T x)^2]`` (measured from input second
   moments: the old tasks' mean, kept as a statistic, and the new task's, measured before training).
   ``least_used`` (default) takes the ``r`` directions that move old and new outputs least,
   ``E_old[(q^T x)^2] + E_t[(q^T x)^2]``; ``sensitivity`` those that move old outputs least against new
   ones, ``E_old[(q^T x)^2] - E_t[(q^T x)^2]``; ``score`` is the first reconstruction's ratio
   ``q^T C_old q / (q^T C_t q + eps)``; ``random`` takes any ``r``. These four pick pool columns; ``contrast``
   instead turns inside the free span to the ``r`` directions with the most new-task energy per unit of
   old-task energy (generalized eigenvectors; with no old task, the new inputs' principal directions).
   Evidence (benchmarks/RESULTS.md, 3 seeds): on 20 Newsgroups 5 x 4 ``least_used`` beats random selection by
   +0.014 +- 0.009 at 64 tokens and +0.013 +- 0.016 at 128; ``sensitivity`` and ``score`` lose to random (64
   tokens), and ``contrast`` to ``least_used`` by 0.097 +- 0.018 (128 tokens). There training the head alone on
   the frozen encoder beats every LoRA method, so ``least_used`` may win by adapting least. On the 4-domain
   split the selections tie. On the language-model benchmark ``least_used`` barely learns and ``contrast``
   beats random by +0.215 +- 0.032 (every seed), so the LLM configs use ``contrast``; the default stays
   ``least_used``.
3. *Perturbation-based optimisation that minimises conflicts* (``perturbation``): ``conflict`` adds to the
   training loss ``perturbation_scale`` times the layers' mean interference ratio ``E_old||B_t A_t x||^2 /
   E_t||B_t A_t x||^2``: the response of the new adapter to inputs drawn from the old tasks' input
   distribution (the perturbation, taken in expectation from the kept statistics, so no old data and no
   noise), per unit of its response to the new task's, so ``B_t`` is steered to the combinations of its basis
   that conflict least with what earlier tasks learned. ``future`` adds, at every training step, a random
   low-rank update along still-free pool directions (norm ``perturbation_scale``), so ``B_t`` is trained to
   tolerate the adapters later tasks will add; ``past`` instead perturbs the frozen past adapters' ``B``
   (relative norm ``perturbation_scale``); ``none`` (default) trains plainly. Neither ``conflict`` nor
   ``future`` beat ``none`` beyond the seeds' spread in the benchmark (with ``contrast`` on the language model
   they left the accuracy matrix unchanged), so the default leaves them off. The
   SAM-style worst-case reading is not implemented.

``train_basis=True`` also trains ``A_t``, projected after every step out of the protected subspace (the
memory plus the other tasks' directions; the shared gradient-projection piece of :class:`SubspaceMemory`).
Use with ``TaskSequencer(adapters='stacked')``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from plan.callbacks.sequencer import run_seed
from plan.callbacks.subspace_memory import SubspaceMemory
from plan.errors import require
from plan.seeding import step_seed
from plan.sharding import full_tensor
from plan.subspace import (
    contrast_directions,
    interference_ratio,
    interference_scores,
    minor_weight_directions,
    ordered_basis,
    orthonormalize,
    project_out,
    random_orthonormal,
    select_lowest,
    sensitivity_scores,
    top_directions,
)

POOLS = ("random", "weight_minor", "input_eigen")
SELECTIONS = ("least_used", "contrast", "sensitivity", "score", "random")
PERTURBATIONS = ("none", "conflict", "future", "past")
DEFAULT_SCALE = {"conflict": 1.0, "future": 0.1, "past": 0.1, "none": 0.0}  # a weight, a norm, a relative norm


class PLAN(SubspaceMemory):
    """Per-task orthogonal bases from a pool planned before the first task; see the module docstring.
    ``perturbation_scale`` defaults to the perturbation's own (``DEFAULT_SCALE``); ``seed`` (pool, random
    selection, perturbation draws) to the run's ``seed_everything`` value."""

    def __init__(
        self,
        pool: str = "random",
        pool_size: int | None = None,
        selection: str = "least_used",
        perturbation: str = "none",
        perturbation_scale: float | None = None,
        train_basis: bool = False,
        threshold_start: float = 0.95,
        threshold_end: float = 1.0,
        max_examples: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(threshold_start, threshold_end, max_examples)
        for name, value, valid in (
            ("pool", pool, POOLS),
            ("selection", selection, SELECTIONS),
            ("perturbation", perturbation, PERTURBATIONS),
        ):
            require(value in valid, f"PLAN {name} must be one of {valid}, got {value!r}")
        if perturbation_scale is None:
            perturbation_scale = DEFAULT_SCALE[perturbation]
        require(
            perturbation_scale >= 0,
            f"PLAN perturbation_scale must be >= 0 (a norm or a weight), got {perturbation_scale}",
        )
        require(
            pool_size is None or pool_size >= 1,
            f"PLAN pool_size must be >= 1 or None (the layer's input width), got {pool_size}",
        )
        self.pool_kind, self.pool_size, self.selection = pool, pool_size, selection
        self.perturbation, self.perturbation_scale = perturbation, perturbation_scale
        self.train_basis, self.seed = train_basis, seed
        self.pools: dict[str, Tensor] = {}
        self.allocated: dict[str, list[Tensor]] = {}
        self.old_covariance: dict[str, Tensor] = {}
        self._hooks: list = []
        self._noise: dict[str, Tensor] = {}
        self._free: dict[str, Tensor] = {}  # self.free on the model's device while a task trains
        self.free: dict[str, Tensor] = {}  # per layer, the still-free directions the current task is perturbed along
        # per layer, the old tasks' and the current task's input second moments seen through the task's basis
        self.moments: dict[str, tuple[Tensor, Tensor]] = {}

    # -- components ---------------------------------------------------------------------------------------

    def build_pool(self, layer, covariance: Tensor, generator: torch.Generator) -> Tensor:
        """Component 1: an orthonormal pool of input directions (``d_in x P``), planned before task 0."""
        size = self.pool_size or layer.in_features
        if not layer.rank <= size <= layer.in_features:
            raise ValueError(f"PLAN pool_size={size} must lie in rank..in_features = {layer.rank}..{layer.in_features}")
        if self.pool_kind == "random":
            return random_orthonormal(layer.in_features, size, generator)
        if self.pool_kind == "weight_minor":
            return minor_weight_directions(full_tensor(layer.base_layer.weight), size)
        return top_directions(covariance, size)

    def allocate(self, candidates: Tensor, old: Tensor, new: Tensor, rank: int, generator: torch.Generator) -> Tensor:
        """Component 2: the ``rank`` orthonormal directions (``d x rank``) in the free candidates' span to give
        the task (``old``: the old tasks' mean input second moment, ``new``: the new task's)."""
        if self.selection == "contrast":
            return contrast_directions(candidates, old, new, rank)
        return candidates[:, self.select(candidates, old, new, rank, generator)]

    def select(self, candidates: Tensor, old: Tensor, new: Tensor, rank: int, generator: torch.Generator) -> Tensor:
        """The selections that pick candidate columns: the indices of the ``rank`` to allocate."""
        if self.selection == "random":
            return torch.randperm(candidates.shape[1], generator=generator)[:rank]
        new_energy = ((new @ candidates) * candidates).sum(0)
        if self.selection == "least_used":
            return select_lowest(((old + new) @ candidates * candidates).sum(0), rank)
        score = sensitivity_scores if self.selection == "sensitivity" else interference_scores
        return select_lowest(score(candidates, old, new), rank, tie_break=new_energy)

    # -- allocation ---------------------------------------------------------------------------------------

    def owned(self, name: str, dim: int, exclude_last: bool = False) -> Tensor:
        """Orthonormal basis of the memory plus the directions tasks own (optionally not the current one)."""
        blocks = self.allocated.get(name, [])
        blocks = blocks[:-1] if exclude_last else blocks
        return orthonormalize(torch.cat([self.memory(name, dim), *blocks], dim=1))

    def free_directions(self, name: str, dim: int) -> Tensor:
        """The pool's part outside everything owned: the candidates a task may still take, orthonormalised in
        pool order (a basis that does not turn with rounding, so one process and several pick the same)."""
        return ordered_basis(project_out(self.pools[name], self.owned(name, dim)))

    @torch.no_grad()
    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        generator = torch.Generator().manual_seed(run_seed(self.seed) * 7919 + task)
        covariances = self.input_covariances(trainer, pl_module, task)
        free: dict[str, Tensor] = {}
        for name, layer in pl_module.lora_layers.items():
            dim, new = layer.in_features, covariances[name]
            if name not in self.pools:
                self.pools[name] = self.build_pool(layer, new, generator)
            candidates = self.free_directions(name, dim)
            if candidates.shape[1] < layer.rank:
                raise ValueError(
                    f"PLAN: layer '{name}' has {candidates.shape[1]} free directions left for task {task}, needs "
                    f"rank {layer.rank}; use a larger pool_size, a smaller rank, or a lower memory threshold"
                )
            old = self.old_covariance.get(name, torch.zeros_like(new)) / max(task, 1)  # mean over old tasks
            basis = self.allocate(candidates, old, new, layer.rank, generator)
            self.allocated.setdefault(name, []).append(basis)
            self.moments[name] = (basis.T @ old @ basis, basis.T @ new @ basis)
            # the rest stay free; 2 r candidates, projected out of the r taken, still span r directions
            free[name] = ordered_basis(project_out(candidates[:, : 2 * layer.rank], basis))[:, : layer.rank]
            layer.lora_A.copy_(basis.T.to(layer.lora_A))
            layer.lora_B.zero_()
            layer.lora_A.requires_grad_(self.train_basis)
        self.free = free
        self._start_perturbation(pl_module)

    def on_task_resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        for layer in pl_module.lora_layers.values():
            layer.lora_A.requires_grad_(self.train_basis)
        self._start_perturbation(pl_module)

    def update_memory(self, covariances: dict[str, Tensor], task: int, num_tasks: int) -> None:
        """Also keep the old tasks' summed input second moments, the numerator of the selection score."""
        super().update_memory(covariances, task, num_tasks)
        for name, covariance in covariances.items():
            self.old_covariance[name] = self.old_covariance.get(name, 0) + covariance

    def protected_basis(self, name: str, dim: int) -> Tensor | None:
        return self.owned(name, dim, exclude_last=True) if self.train_basis else None

    # -- component 3: perturbation ------------------------------------------------------------------------

    def _start_perturbation(self, pl_module: pl.LightningModule) -> None:
        self._stop_perturbation()
        if self.perturbation == "conflict":
            self._register_conflict(pl_module)
        if self.perturbation in ("none", "conflict"):
            return
        for name, layer in pl_module.lora_layers.items():
            if self.perturbation == "future":
                self._free[name] = self.free[name].to(layer.lora_A)
            self._hooks.append(
                layer.register_forward_hook(lambda module, args, out, n=name: self._perturb(n, module, args[0], out))
            )

    def _register_conflict(self, pl_module: pl.LightningModule) -> None:
        """The ``conflict`` term: ``perturbation_scale`` times the layers' mean interference ratio (measured
        through the basis allocated at the task start; with ``train_basis`` the basis moves a little from it)."""
        layers = pl_module.lora_layers
        moments = {
            name: (old.to(layers[name].lora_B), new.to(layers[name].lora_B))
            for name, (old, new) in self.moments.items()
        }

        def conflict() -> Tensor:
            ratios = [interference_ratio(layers[name].lora_B, old, new) for name, (old, new) in moments.items()]
            return self.perturbation_scale * torch.stack(ratios).mean()

        pl_module.register_loss_term("plan_conflict", conflict)

    def _stop_perturbation(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._noise, self._free = [], {}, {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """Draw this step's perturbation: ``U F^T`` with ``||U||_F = scale`` (future) or ``dB`` with
        ``||dB|| = scale * ||B_past||`` (past)."""
        if self.perturbation in ("none", "conflict"):
            return
        generator = torch.Generator().manual_seed(step_seed(run_seed(self.seed), trainer.current_epoch, batch_idx))
        for name, layer in pl_module.lora_layers.items():
            width = self._free[name].shape[1] if self.perturbation == "future" else layer.past_rank
            noise = torch.randn(layer.out_features, width, generator=generator, dtype=torch.float64)
            reference = 1.0 if self.perturbation == "future" else layer.past_B.norm().item()
            self._noise[name] = (self.perturbation_scale * reference * noise / noise.norm().clamp_min(1e-12)).to(
                layer.lora_B
            )

    def _perturb(self, name: str, module, x: Tensor, out: Tensor) -> Tensor | None:
        noise = self._noise.get(name)
        if not module.training or noise is None or noise.shape[1] == 0:
            return None
        down = self._free[name] if self.perturbation == "future" else module.past_A.T
        return out + (x @ down) @ noise.T

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_perturbation()
        pl_module.loss_terms.pop("plan_conflict", None)

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "pools": self.pools,
            "allocated": self.allocated,
            "old_covariance": self.old_covariance,
            "free": self.free,
            "moments": self.moments,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.pools, self.allocated, self.old_covariance, self.free, self.moments = (
            state_dict["pools"],
            state_dict["allocated"],
            state_dict["old_covariance"],
            state_dict["free"],
            state_dict["moments"],
        )
