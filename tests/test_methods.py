"""Continual-learning methods: each one's claim checked on small tensors, a constructed sequence, and resume."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_BERT, task_trainer
from torch import nn

from plan.callbacks import (
    PLAN,
    ForgettingLogger,
    GradientProjection,
    InfLoRA,
    OLoRA,
    ProgressiveActivation,
    TaskCallback,
    TaskSequencer,
)
from plan.callbacks.coto import activation_probability, layer_groups
from plan.cli import run_cli
from plan.datamodules import DataSource, Examples, SyntheticSource, TaskSequenceDataModule
from plan.lora import LoRAConfig, LoRALinear
from plan.module import ContinualClassifier
from plan.subspace import (
    contrast_directions,
    expand_memory,
    interference_ratio,
    interference_scores,
    orthogonality_penalty,
    random_orthonormal,
    select_lowest,
    sensitivity_scores,
)

# -- pure pieces --------------------------------------------------------------------------------------------


def test_orthogonality_penalty_matches_hand_computation():
    old = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    new = torch.tensor([[1.0, -2.0, 5.0]])
    assert orthogonality_penalty(old, new, "abs").item() == pytest.approx(3.0)
    assert orthogonality_penalty(old, new, "squared").item() == pytest.approx(5.0)
    assert orthogonality_penalty(torch.zeros(0, 3), new).item() == 0.0


def test_selection_picks_lowest_interference_on_a_known_example():
    """In a rotated frame with old energy (0, 5, 0, 1) and new energy (1, 1, 3, 1), the two least interfering
    directions are 0 and 2 (score 0); the tie goes to direction 2, which the new task uses more."""
    rotation = random_orthonormal(4, 4, torch.Generator().manual_seed(0))
    old = rotation @ torch.diag(torch.tensor([0.0, 5.0, 0.0, 1.0], dtype=torch.float64)) @ rotation.T
    new = rotation @ torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0], dtype=torch.float64)) @ rotation.T
    scores = interference_scores(rotation, old, new)
    torch.testing.assert_close(scores, torch.tensor([0.0, 5.0, 0.0, 1.0], dtype=torch.float64), atol=1e-9, rtol=0)
    new_energy = torch.tensor([1.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    assert select_lowest(scores, 2, tie_break=new_energy).tolist() == [2, 0]
    assert select_lowest(scores, 3, tie_break=new_energy).tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="pool of 4"):
        select_lowest(scores, 5)


def test_selections_rank_directions_by_the_measured_output_movement():
    """Sensitivity scores equal mean old minus mean new squared projections of explicit samples. In a frame
    where old energy is (1, 0, 0, 3) and new (4, 1e-9, 2, 3), sensitivity takes directions 0 and 2, which the
    new task uses most against the old; the first reconstruction's ratio takes 2 and the direction 1 that
    neither task uses, and least_used takes 1 and 2, which move every task's outputs least."""
    g = torch.Generator().manual_seed(0)
    old_x, new_x = (
        torch.randn(50, 6, generator=g, dtype=torch.float64),
        torch.randn(40, 6, generator=g, dtype=torch.float64),
    )
    candidates = random_orthonormal(6, 4, g)
    expected = ((old_x @ candidates) ** 2).mean(0) - ((new_x @ candidates) ** 2).mean(0)
    got = sensitivity_scores(candidates, old_x.T @ old_x / 50, new_x.T @ new_x / 40)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)

    rotation = random_orthonormal(4, 4, g)
    old = rotation @ diagonal(1.0, 0.0, 0.0, 3.0) @ rotation.T
    new = rotation @ diagonal(4.0, 1e-9, 2.0, 3.0) @ rotation.T
    new_energy = torch.tensor([4.0, 1e-9, 2.0, 3.0], dtype=torch.float64)
    assert sorted(select_lowest(sensitivity_scores(rotation, old, new), 2, new_energy).tolist()) == [0, 2]
    assert sorted(select_lowest(interference_scores(rotation, old, new), 2, new_energy).tolist()) == [1, 2]
    # least_used: the directions that move old and new outputs least, old + new = (5, ~0, 2, 6)
    generator = torch.Generator().manual_seed(0)
    assert sorted(PLAN(selection="least_used").select(rotation, old, new, 2, generator).tolist()) == [1, 2]
    assert sorted(PLAN(selection="sensitivity").select(rotation, old, new, 2, generator).tolist()) == [0, 2]


def span_projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ torch.linalg.pinv(basis)


def test_contrast_takes_the_most_new_energy_per_unit_of_old_energy():
    """In a frame with old energy (0, 5, 0, 1) and new (1, 1, 3, 1) the shift is the mean new energy 1.5, so the
    ratios new / (old + 1.5) are (0.67, 0.15, 2, 0.4): contrast takes directions 2 and 0. On a random pool it
    spans the leading eigenvectors of (C_old + s I)^-1 C_new (a general eigensolver, independent of its
    Cholesky route), turned inside the pool's span, orthonormal; with no old task, the new inputs' principal
    directions in the span."""
    rotation = random_orthonormal(4, 4, torch.Generator().manual_seed(0))
    old = rotation @ diagonal(0.0, 5.0, 0.0, 1.0) @ rotation.T
    new = rotation @ diagonal(1.0, 1.0, 3.0, 1.0) @ rotation.T
    torch.testing.assert_close(
        span_projector(contrast_directions(rotation, old, new, 2)), span_projector(rotation[:, [2, 0]])
    )
    generator = torch.Generator().manual_seed(0)
    chosen = PLAN(selection="contrast").allocate(rotation, old, new, 1, generator)
    torch.testing.assert_close(span_projector(chosen), span_projector(rotation[:, [2]]))

    g = torch.Generator().manual_seed(3)
    old_x, new_x = (
        torch.randn(40, 7, generator=g, dtype=torch.float64),
        torch.randn(30, 7, generator=g, dtype=torch.float64),
    )
    old, new = old_x.T @ old_x / 40, (new_x * torch.arange(1.0, 8.0, dtype=torch.float64)).T @ new_x / 30
    new = (new + new.T) / 2
    pool = random_orthonormal(7, 5, g)
    basis = contrast_directions(pool, old, new, 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(span_projector(pool) @ basis, basis)  # inside the pool's span
    new_in, old_in = pool.T @ new @ pool, pool.T @ old @ pool
    values, vectors = torch.linalg.eig(torch.linalg.solve(old_in + new_in.trace() / 5 * torch.eye(5), new_in))
    leading = vectors.real[:, values.real.argsort(descending=True)[:2]]
    torch.testing.assert_close(span_projector(basis), span_projector(pool @ leading))
    no_old = contrast_directions(pool, torch.zeros_like(old), new, 2)
    _, eigenvectors = torch.linalg.eigh(new_in)
    torch.testing.assert_close(span_projector(no_old), span_projector(pool @ eigenvectors[:, -2:]))
    with pytest.raises(ValueError, match="pool of 5"):
        contrast_directions(pool, old, new, 6)


def test_interference_ratio_is_the_old_over_new_output_movement_of_samples():
    g = torch.Generator().manual_seed(1)
    old_x, new_x = (
        torch.randn(30, 8, generator=g, dtype=torch.float64),
        torch.randn(20, 8, generator=g, dtype=torch.float64),
    )
    a = random_orthonormal(8, 3, g).T  # 3 x 8, rows orthonormal
    b = torch.randn(5, 3, generator=g, dtype=torch.float64)
    moved = lambda x: (x @ a.T @ b.T).pow(2).sum(1).mean()
    in_basis = lambda x: a @ (x.T @ x / len(x)) @ a.T
    got = interference_ratio(b, in_basis(old_x), in_basis(new_x))
    torch.testing.assert_close(got, moved(old_x) / moved(new_x), atol=1e-12, rtol=1e-10)
    assert interference_ratio(torch.zeros(5, 3, dtype=torch.float64), in_basis(old_x), in_basis(new_x)).item() == 0.0


def test_memory_with_threshold_one_spans_the_inputs():
    inputs = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)  # rank 3 in R^8
    basis = expand_memory(torch.zeros(8, 0, dtype=torch.float64), inputs.T @ inputs / 10, threshold=1.0)
    assert basis.shape == (8, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))
    residual = inputs.T - basis @ (basis.T @ inputs.T)
    assert residual.abs().max() < 1e-8


def diagonal(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float64))


def unit(*indices: int, dim: int = 4) -> torch.Tensor:
    return torch.eye(dim, dtype=torch.float64)[:, list(indices)]


def span(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


def test_first_task_keeps_the_directions_whose_cumulative_energy_stays_below_the_threshold():
    """C = diag(4, 3, 2, 1), threshold 0.85. GPM's energies are the eigenvalues: ratios .4 .3 .2 .1, cumulative
    .4 .7 .9 1.0, so 2 stay below (the previous rule, 'reach the threshold', kept 3). InfLoRA's energies are
    the squared singular values 16 9 4 1 of 30: cumulative .533 .833 .967 1.0, so 2."""
    empty = torch.zeros(4, 0, dtype=torch.float64)
    covariance = diagonal(4, 3, 2, 1)
    torch.testing.assert_close(span(expand_memory(empty, covariance, 0.85, "gpm", first_task=True)), span(unit(0, 1)))
    torch.testing.assert_close(
        span(expand_memory(empty, covariance, 0.85, "inflora", first_task=True)), span(unit(0, 1))
    )
    # where the two differ: threshold 0.8 keeps 2 under GPM (.4 .7 < .8) and 1 under InfLoRA (.533 < .8 < .833)
    assert expand_memory(empty, covariance, 0.8, "gpm", first_task=True).shape[1] == 2
    assert expand_memory(empty, covariance, 0.8, "inflora", first_task=True).shape[1] == 1
    # on a later task, an empty memory grows by the other rule: .4 .7 .9 reaches .8 with 3 (GPM)
    assert expand_memory(empty, covariance, 0.8, "gpm").shape[1] == 3


def test_later_tasks_add_directions_until_the_captured_energy_reaches_the_threshold():
    """Memory e0, C = diag(4, 3, 2, 1). InfLoRA (official code): (I - MM^T) C = diag(0, 3, 2, 1), captured
    (30 - 14) / 30 = .533; adding 9/30 gives .833 < .9, adding 4/30 gives .967: e1 and e2 join. GPM: captured
    .4; adding .3 gives .7, adding .2 gives .9 >= .9: e1 and e2 join too; at .95 GPM needs e3 as well."""
    memory = unit(0)
    covariance = diagonal(4, 3, 2, 1)
    torch.testing.assert_close(span(expand_memory(memory, covariance, 0.9, "inflora")), span(unit(0, 1, 2)))
    torch.testing.assert_close(span(expand_memory(memory, covariance, 0.9 - 1e-9, "gpm")), span(unit(0, 1, 2)))
    torch.testing.assert_close(span(expand_memory(memory, covariance, 0.95, "gpm")), span(unit(0, 1, 2, 3)))
    assert expand_memory(memory, covariance, 0.95, "inflora").shape[1] == 3  # .967 >= .95 after two


def test_inflora_uses_its_own_memory_rule_unless_asked_for_gpms():
    assert InfLoRA().memory_rule == "inflora" and InfLoRA(memory="gpm").memory_rule == "gpm"
    assert GradientProjection().memory_rule == "gpm"
    with pytest.raises(ValueError, match="memory rule must be one of"):
        InfLoRA(memory="dualgpm")


def test_coto_schedule_and_groups():
    assert activation_probability(0, 100, 0.1, 0.75) == pytest.approx(0.1)
    assert activation_probability(30, 100, 0.1, 0.75) == pytest.approx(0.1 + 0.9 * 30 / 75)
    assert activation_probability(75, 100, 0.1, 0.75) == 1.0 and activation_probability(99, 100, 0.1, 0.75) == 1.0
    names = [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.query",
        "pooler.dense",
    ]
    assert layer_groups(names) == [names[:2], [names[2]], [names[3]]]


# -- a sequence where exact non-interference is possible ----------------------------------------------------


class VectorEncoder(nn.Module):
    """A two-layer MLP encoder over vectors, shaped like a Hugging Face encoder's output."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.fc2(torch.relu(self.fc1(pixel_values))).unsqueeze(1))


class BlockSource(DataSource):
    """Two classes per task; task t's inputs live only in coordinates 8t..8t+7, so tasks use disjoint input
    subspaces at the first layer and few directions (<= examples) at the second."""

    def __init__(self, tasks: int = 2, per_class: int = 12) -> None:
        self.tasks, self.per_class = tasks, per_class

    def load(self, split: str) -> Examples:
        g = torch.Generator().manual_seed(int(split == "test"))
        inputs, labels = [], []
        for c in range(2 * self.tasks):
            x = torch.zeros(self.per_class, 8 * self.tasks)
            block = slice(8 * (c // 2), 8 * (c // 2) + 8)
            x[:, block] = 2.0 * torch.randn(8, generator=torch.Generator().manual_seed(c)) + 0.5 * torch.randn(
                self.per_class, 8, generator=g
            )
            inputs.append(x)
            labels += [f"c{c}"] * self.per_class
        return Examples(torch.cat(inputs), labels)


class FeatureSnapshot(TaskCallback):
    """Records the encoder's features on task 0's training inputs when task 0 ends."""

    def on_task_end(self, trainer, pl_module, task):
        if task == 0:
            self.features = task_zero_features(trainer, pl_module)


@torch.no_grad()
def task_zero_features(trainer, pl_module) -> torch.Tensor:
    batches = list(trainer.datamodule.task_train_loader(0))
    pl_module.eval()
    features = torch.cat([pl_module.features(b) for b in batches])
    pl_module.train()
    return features


def run_blocks(tmp_path, *methods) -> tuple[torch.Tensor, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(
        BlockSource(), classes_per_task=2, batch_size=8, passes_per_task=3, tasks=[["c0", "c1"], ["c2", "c3"]]
    )
    model = ContinualClassifier(
        backbone=VectorEncoder(), lora=LoRAConfig(rank=2, alpha=4, target_modules=["fc1", "fc2"]), lr=0.05
    )
    snapshot = FeatureSnapshot()
    trainer = task_trainer(tmp_path, [TaskSequencer(seed=0), ForgettingLogger(heatmap=False), *methods, snapshot])
    trainer.fit(model, datamodule=data)
    return snapshot.features, task_zero_features(trainer, model)


@pytest.mark.parametrize(
    "method",
    [
        lambda: InfLoRA(threshold_start=1.0, threshold_end=1.0),
        lambda: PLAN(threshold_start=1.0, threshold_end=1.0),
        lambda: PLAN(threshold_start=1.0, threshold_end=1.0, perturbation="past", train_basis=True),
        lambda: GradientProjection(threshold_start=1.0, threshold_end=1.0),
    ],
    ids=["inflora", "plan", "plan-past-trainbasis", "gpm"],
)
def test_new_task_leaves_old_task_outputs_unchanged(tmp_path, method):
    before, after = run_blocks(tmp_path, method())
    assert (after - before).abs().max() < 1e-4


def test_plain_stacked_lora_changes_old_task_outputs(tmp_path):
    before, after = run_blocks(tmp_path)
    assert (after - before).abs().max() > 1e-2


# -- each method on the tiny BERT -----------------------------------------------------------------------------


class Probe(TaskCallback):
    """Runs ``check(pl_module, task)`` after the methods' own task start (it comes later in the callback list)."""

    def __init__(self, check) -> None:
        self.check = check

    def on_task_start(self, trainer, pl_module, task):
        self.check(pl_module, task)


def fit_tiny(tmp_path, *callbacks, adapters: str = "stacked", tasks: int = 3):
    pl.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(SyntheticSource(num_classes=2 * tasks), classes_per_task=2, batch_size=8)
    model = ContinualClassifier(backbone_config=TINY_BERT, lora=LoRAConfig(rank=4, alpha=8), lr=0.01)
    trainer = task_trainer(tmp_path, [TaskSequencer(adapters=adapters, seed=0), *callbacks])
    trainer.fit(model, datamodule=data)
    return model


@torch.no_grad()
def hooked_inputs(trainer, pl_module, task: int, max_examples: int | None = None) -> dict[str, torch.Tensor]:
    """Every real token's input to every LoRA layer (padding left out) over ``task``'s training data, in plain torch."""
    inputs: dict[str, list] = {name: [] for name in pl_module.lora_layers}
    batch: dict = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda _, args, n=name: inputs[n].append(args[0][batch["attention_mask"].bool()].double())
        )
        for name, layer in pl_module.lora_layers.items()
    ]
    pl_module.eval()
    for batch in trainer.datamodule.task_train_loader(task, max_examples):
        pl_module(batch)
    pl_module.train()
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(x) for name, x in inputs.items()}


class CovarianceCheck(TaskCallback):
    """At task 0's start, the method's input covariances next to ones computed from hooked inputs in plain torch."""

    def __init__(self, method, max_examples: int) -> None:
        self.method, self.max_examples = method, max_examples

    def on_task_start(self, trainer, pl_module, task):
        if task:
            return
        inputs = hooked_inputs(trainer, pl_module, 0, self.max_examples)
        self.expected = {name: x.T @ x / len(x) for name, x in inputs.items()}
        self.got = self.method.input_covariances(trainer, pl_module, 0)


def test_input_covariances_match_plain_torch_and_are_shared_by_layers_reading_one_input(tmp_path):
    method = GradientProjection(max_examples=12)
    check = CovarianceCheck(method, 12)
    fit_tiny(tmp_path, method, check, tasks=1)
    for name, expected in check.expected.items():
        torch.testing.assert_close(check.got[name], expected, atol=1e-10, rtol=1e-10)
    blocks = sorted({name.rsplit(".", 1)[0] for name in check.got})
    assert len(blocks) > 1
    for block in blocks:  # query and value read the same hidden states: one tensor; other blocks: their own
        assert check.got[f"{block}.query"] is check.got[f"{block}.value"]
    assert check.got[f"{blocks[0]}.query"] is not check.got[f"{blocks[1]}.query"]


def test_inflora_down_projection_is_orthogonal_to_memory(tmp_path):
    method = InfLoRA(threshold_start=0.6, threshold_end=0.8)
    overlaps = []

    def check(pl_module, task):
        for name, layer in pl_module.lora_layers.items():
            memory = method.memory(name, layer.in_features).to(layer.lora_A)
            overlaps.append(
                (task, memory.shape[1], (layer.lora_A @ memory).abs().max().item() if memory.shape[1] else 0.0)
            )
            assert not layer.lora_A.requires_grad

    fit_tiny(tmp_path, method, Probe(check))
    assert any(task > 0 and size > 0 for task, size, _ in overlaps), "the memory was used"
    assert max(overlap for _, _, overlap in overlaps) < 1e-5


@pytest.mark.parametrize("selection", ["least_used", "contrast"])
def test_plan_bases_are_orthonormal_and_disjoint(tmp_path, selection):
    """Columns picked from the pool or turned inside its free span, every task's basis is orthonormal and
    orthogonal to every other task's."""
    method = PLAN(selection=selection, threshold_start=0.5, threshold_end=0.6)
    model = fit_tiny(tmp_path, method)
    for name, layer in model.lora_layers.items():
        bases = torch.cat(method.allocated[name], dim=1)
        assert bases.shape[1] == 3 * layer.rank
        torch.testing.assert_close(bases.T @ bases, torch.eye(3 * layer.rank, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.past_A, bases.T.to(layer.past_A), atol=1e-6, rtol=0)


def test_plan_draws_follow_the_run_seed_unless_given_one(tmp_path, monkeypatch):
    """PLAN's pool and random selection use the run's ``seed_everything`` value, or a fixed seed if given one."""
    monkeypatch.setattr(pl, "seed_everything", lambda *args, **kwargs: None)  # keep the run seed set below

    def first_basis(run_seed: int, seed: int | None) -> torch.Tensor:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))
        method = PLAN(selection="random", seed=seed)
        fit_tiny(tmp_path / f"{run_seed}-{seed}", method, tasks=1)
        return next(iter(method.allocated.values()))[0]

    assert not torch.equal(first_basis(1, None), first_basis(2, None))
    assert torch.equal(first_basis(1, 5), first_basis(2, 5))


@pytest.mark.parametrize("selection", ["least_used", "contrast"])
def test_plan_future_perturbation_lies_outside_everything_owned(tmp_path, selection):
    method = PLAN(selection=selection, threshold_start=0.5, threshold_end=0.6, perturbation="future")
    seen = []

    def check(pl_module, task):
        for name, layer in pl_module.lora_layers.items():
            directions = method._free[name].double()
            owned = method.owned(name, layer.in_features)
            torch.testing.assert_close(
                directions.T @ directions, torch.eye(layer.rank, dtype=torch.float64), atol=1e-6, rtol=0
            )
            seen.append((owned.shape[1], (owned.T @ directions).abs().max().item()))

    fit_tiny(tmp_path, method, Probe(check))
    assert any(size > 0 for size, _ in seen) and max(overlap for _, overlap in seen) < 1e-6


class ConflictCheck(TaskCallback):
    """Keeps every finished task's layer inputs (the test may keep old data; PLAN may not) and, a few steps into
    each later task, compares PLAN's conflict term with the old tasks' mean output movement per unit of the new
    task's, computed from those inputs and the ones hooked at the task start."""

    def __init__(self, method) -> None:
        self.method, self.ended, self.task, self.checked = method, [], 0, []

    def on_task_start(self, trainer, pl_module, task):
        self.task, self.starting = task, hooked_inputs(trainer, pl_module, task)

    def on_task_end(self, trainer, pl_module, task):
        self.ended.append(hooked_inputs(trainer, pl_module, task))

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.task == 0 or batch_idx != 3:
            return
        ratios = []
        for name, layer in pl_module.lora_layers.items():
            a, b = layer.lora_A.double(), layer.lora_B.double()
            moved = lambda x, a=a, b=b: (x @ a.T @ b.T).pow(2).sum(1).mean()
            ratios.append(
                sum(moved(inputs[name]) for inputs in self.ended) / len(self.ended) / moved(self.starting[name])
            )
        expected = self.method.perturbation_scale * torch.stack(ratios).mean()
        self.checked.append((pl_module.loss_terms["plan_conflict"]().item(), expected.item()))


def test_plan_conflict_term_is_the_old_tasks_output_movement_per_unit_of_the_new_tasks(tmp_path):
    method = PLAN(threshold_start=0.5, threshold_end=0.6, perturbation="conflict", perturbation_scale=0.7)
    check = ConflictCheck(method)
    fit_tiny(tmp_path, method, check)
    assert len(check.checked) == 2 and all(expected > 0 for _, expected in check.checked)
    for got, expected in check.checked:
        assert got == pytest.approx(expected, rel=1e-4)


def test_plan_conflict_steers_the_new_adapters_away_from_old_inputs(tmp_path):
    """Against the same run without it, the conflict term lowers every later task's interference ratio at its end."""
    ratios: dict[str, list[float]] = {}

    class RatioAtTaskEnd(TaskCallback):
        def __init__(self, method, key):
            self.method, self.key = method, key

        def on_task_end(self, trainer, pl_module, task):
            if task:
                values = [
                    interference_ratio(layer.lora_B.detach().double(), *self.method.moments[name]).item()
                    for name, layer in pl_module.lora_layers.items()
                ]
                ratios.setdefault(self.key, []).append(sum(values) / len(values))

    for perturbation in ("conflict", "none"):
        method = PLAN(threshold_start=0.5, threshold_end=0.6, perturbation=perturbation)
        fit_tiny(tmp_path / perturbation, method, RatioAtTaskEnd(method, perturbation))
    assert all(c < n for c, n in zip(ratios["conflict"], ratios["none"], strict=True)), ratios


def test_olora_loss_term_equals_formula(tmp_path):
    method = OLoRA(lambda_orth=0.5, lambda_l2=0.1)
    seen = []

    def check(pl_module, task):
        layers = pl_module.lora_layers.values()
        expected = 0.5 * sum((layer.past_A @ layer.lora_A.T).abs().sum() for layer in layers)
        seen.append((task, pl_module.loss_terms["olora_orth"]().item(), expected.item()))
        l2 = 0.1 * sum(layer.lora_A.norm() + layer.lora_B.norm() for layer in layers)
        assert pl_module.loss_terms["olora_l2"]().item() == pytest.approx(l2.item())

    fit_tiny(tmp_path, method, Probe(check))
    assert seen[0][1] == 0.0 and all(value > 0 for task, value, _ in seen if task > 0)
    assert all(value == pytest.approx(expected, rel=1e-5) for _, value, expected in seen)


def test_olora_refuses_a_shared_adapter(tmp_path):
    with pytest.raises(ValueError, match="stacked"):
        fit_tiny(tmp_path, OLoRA(), adapters="shared")


def test_coto_with_probability_one_is_plain_training(tmp_path):
    plain = fit_tiny(tmp_path / "a")
    coto = fit_tiny(tmp_path / "b", ProgressiveActivation(start=1.0))
    for (name, a), (_, b) in zip(plain.state_dict().items(), coto.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class ActivationSpy(TaskCallback):
    def __init__(self) -> None:
        self.active: list[list[bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active.append([layer.slot_enabled for layer in pl_module.lora_layers.values()])


def test_coto_deactivates_blocks_early_and_keeps_one_active(tmp_path):
    """With p rising from 0 over the first half of each task's 4 steps: step 0 (p = 0) keeps exactly the one
    forced block, the second half (p = 1) keeps every block, and no step runs with every block off."""
    spy = ActivationSpy()
    fit_tiny(tmp_path, ProgressiveActivation(start=0.0, ramp=0.5), spy, tasks=2)
    per_task = [spy.active[:4], spy.active[4:]]
    assert len(spy.active) == 8
    for steps in per_task:
        assert sum(steps[0]) == 2, "one block of two LoRA layers (query and value) stays active"
        assert all(all(step) for step in steps[2:])
    assert all(any(step) for step in spy.active)


# -- resume ---------------------------------------------------------------------------------------------------

METHODS = {
    "olora": [{"class_path": "plan.callbacks.OLoRA"}],
    "inflora": [{"class_path": "plan.callbacks.InfLoRA", "init_args": {"threshold_start": 0.6, "threshold_end": 0.8}}],
    "plan": [{"class_path": "plan.callbacks.PLAN", "init_args": {"threshold_start": 0.5, "threshold_end": 0.6}}],
    "plan+coto": [
        {
            "class_path": "plan.callbacks.PLAN",
            "init_args": {"threshold_start": 0.5, "threshold_end": 0.6, "perturbation": "past"},
        },
        {"class_path": "plan.callbacks.ProgressiveActivation", "init_args": {"start": 0.2}},
    ],
    "gpm": [
        {"class_path": "plan.callbacks.GradientProjection", "init_args": {"threshold_start": 0.6, "threshold_end": 0.8}}
    ],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_resumes_to_the_same_matrix(tiny, method):
    callbacks = [
        {"class_path": "plan.callbacks.TaskSequencer"},
        {"class_path": "plan.callbacks.ForgettingLogger"},
        *METHODS[method],
    ]
    full = tiny.config("full", trainer__callbacks=callbacks)
    part = tiny.config("part", trainer__callbacks=callbacks)
    run_cli(["fit", "--config", str(full)])
    run_cli(["fit", "--config", str(part), "--trainer.max_epochs", "1"])
    run_cli(["fit", "--config", str(part), "--ckpt_path", str(tiny.checkpoints("part") / "task-epoch=0.ckpt")])
    torch.testing.assert_close(tiny.matrix("part"), tiny.matrix("full"), rtol=0, atol=0, equal_nan=True)
    full_state, part_state = tiny.last("full")["state_dict"], tiny.last("part")["state_dict"]
    for key in full_state:
        torch.testing.assert_close(part_state[key], full_state[key], rtol=0, atol=0, msg=key)


def test_ordered_basis_spans_the_columns_and_does_not_turn_with_rounding():
    """The projected pool spans a subspace whose singular values are all 1, where an SVD basis may turn freely;
    the ordered basis spans the same subspace and moves no more than its input does."""
    from plan.subspace import ordered_basis, orthonormalize, project_out, random_orthonormal

    g = torch.Generator().manual_seed(0)
    pool, owned = random_orthonormal(32, 32, g), random_orthonormal(32, 5, g)
    projected = project_out(pool, owned)
    basis = ordered_basis(projected)
    assert basis.shape == (32, 27)
    torch.testing.assert_close(basis.T @ basis, torch.eye(27, dtype=torch.float64), atol=1e-12, rtol=0)
    svd = orthonormalize(projected)
    torch.testing.assert_close(basis @ basis.T, svd @ svd.T, atol=1e-12, rtol=0)  # the same subspace
    nudged = ordered_basis(projected + 1e-12 * torch.randn(32, 32, generator=g, dtype=torch.float64))
    assert (nudged - basis).abs().max() < 1e-9


@pytest.mark.parametrize("past_dropout", [False, True])
def test_olora_sets_the_past_adapters_dropout_on_every_layer(past_dropout: bool) -> None:
    layers = {name: LoRALinear(nn.Linear(6, 6), 2, 4.0, dropout=0.1) for name in ("a", "b")}
    module = SimpleNamespace(lora_layers=layers, register_loss_term=lambda name, term: None)
    OLoRA(past_dropout=past_dropout).on_fit_start(None, module)  # type: ignore[arg-type]
    assert [layer.past_dropout for layer in layers.values()] == [past_dropout, past_dropout]
