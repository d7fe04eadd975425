"""Task families (issue 29): a user's own model, data and loss meta-trained on; seeds, budget, resume, the per-member
fallback where vmap cannot batch, and the ``unf lopt --task FILE.py:FN`` command line."""
import json
import math
import types
from pathlib import Path
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_cli import _user_error  # noqa: E402  (tests/ is on sys.path under pytest)
from unf.cli import main
from unf.optim import (DEFAULT_WEIGHTS, LearnedRule, MetaConfig, RuleConfig, TaskFamily, UNFOptimizer, meta_train,
                       train_curve)
from unf.optim import meta
from unf.optim.meta import CheckpointError, FamilyTask, _Inner
from unf.optim.tasks import FAMILIES, META_SEED_BASE, TASKS, GRUClassifier, get_family
from unf.zoo.population import Member, make_population, member_grads


class TwoLayer(nn.Module):
    """A user-style model: its own class and forward, not an ``nn.Sequential``."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.inp, self.out = nn.Linear(5, hidden), nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def _regression_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 1, generator=g)
    x = torch.randn(256, 5, generator=g)
    y = torch.sin(x @ w) + 0.05 * torch.randn(256, 1, generator=g)
    return x[:192], y[:192], x[192:], y[192:]


def _regression_family(hidden: int = 16, name: str = "user-regression", horizon: int = 8) -> TaskFamily:
    def model(seed):
        torch.manual_seed(seed)
        return TwoLayer(hidden)
    return TaskFamily(model, _regression_data, F.mse_loss, batch_size=32, horizon=horizon, name=name)


SMALL_RULE = dict(hidden=4, depth=1, hyper_hidden=4)


def test_user_family_meta_trains_and_lowers_its_meta_loss():
    """A rule started with a far too small step (alpha 1e-5) learns larger ones on the user's family, and its
    meta-loss on a seed never meta-trained on (an evaluation seed) falls."""
    family = _regression_family()
    cfg = MetaConfig(steps=12, pairs=4, sigma=0.05, unroll=4, outer_lr=0.1, estimator="es",
                     rule=dict(SMALL_RULE, alpha=1e-5))
    rule, history = meta_train(cfg, family)
    assert len(history) == 12 and float(rule.log_alpha.detach()) > math.log(1e-5) + 0.5
    seeds = {h["task"]["seed"] for h in history}
    assert len(seeds) == 12 // 2 and all(META_SEED_BASE <= s < 2 ** 31 for s in seeds)  # a new seed per task
    assert {h["task"]["family"] for h in history} == {"user-regression"}
    scores = []
    for r in (LearnedRule(RuleConfig(**cfg.rule)), rule):
        inner = _Inner(FamilyTask(family, seed=3), cfg, r, 0, 1)
        scores.append(float(inner.unroll(r, None, 8, cfg.loss_clip)[-1]))
    assert scores[1] < scores[0]


def test_family_losses_and_gradients_match_plain_models():
    """member_grads with the family's loss (vmapped) gives each member's own loss and gradient."""
    family = _regression_family()
    x, y = family.data()[:2]
    pop = make_population(TwoLayer, [Member(seed=s) for s in (1, 2, 3)])  # build_member seeds the RNG
    losses, grads = member_grads(pop, x[:32], y[:32], loss=family.loss, same_input=True)
    for i, s in enumerate((1, 2, 3)):
        torch.manual_seed(s)
        m = family.model(s)
        loss = F.mse_loss(m(x[:32]), y[:32])
        g = torch.autograd.grad(loss, list(m.parameters()))
        assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-5)
        assert torch.allclose(grads[i], torch.cat([t.flatten() for t in g]), atol=1e-6)


def test_gru_members_run_one_by_one_with_the_same_results():
    """vmap has no batching rule for aten::gru: the population warns once and loops over its members."""
    family = TASKS["majority-gru"]
    x, y = family.data()[:2]
    pop = make_population(GRUClassifier, [Member(seed=s) for s in (1, 2)])  # build_member seeds the RNG
    with pytest.warns(UserWarning, match="one by one"):
        losses, grads = member_grads(pop, x[:16], y[:16], loss=family.loss, same_input=True)
    assert not pop.batched
    for i, s in enumerate((1, 2)):
        m = family.build(s)
        loss = F.cross_entropy(m(x[:16]), y[:16])
        g = torch.autograd.grad(loss, list(m.parameters()))
        assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-5)
        assert torch.allclose(grads[i], torch.cat([t.flatten() for t in g]), atol=1e-6)
    cfg = MetaConfig(steps=1, pairs=1, unroll=2, rule=SMALL_RULE)
    with pytest.warns(UserWarning, match="one by one"):
        _, history = meta_train(cfg, TaskFamily(family.model, family.data, F.cross_entropy, 16, 4, name="gru"))
    assert math.isfinite(history[0]["meta_loss"])


class _Clock:
    """A stand-in for ``time`` in unf.optim.meta: every reading is 0.5 s after the last (one step: 0.5 s)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.5
        return self.now


def _theta(rule):
    return torch.cat([p.detach().flatten() for p in rule.parameters()])


def test_budget_stops_meta_training_and_counts_over_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(meta, "time", types.SimpleNamespace(perf_counter=_Clock().perf_counter))
    family = _regression_family(horizon=4)  # unroll 2: a task is 2 outer steps
    cfg = lambda budget: MetaConfig(steps=None, budget_s=budget, pairs=2, unroll=2, rule=SMALL_RULE)  # noqa: E731
    _, hist = meta_train(cfg(1.75), family, out=tmp_path, checkpoint_every=1)
    assert len(hist) == 4 and all(h["seconds"] == 0.5 for h in hist)  # stops once 1.75 s are spent
    _, again = meta_train(cfg(1.75), family, out=tmp_path, checkpoint_every=1)
    assert len(again) == 4  # the budget was spent before: nothing more
    resumed, longer = meta_train(cfg(3.0), family, out=tmp_path, checkpoint_every=1)
    assert len(longer) == 6  # a larger budget extends the run, counting the 2 s already spent
    whole, _ = meta_train(cfg(3.0), family)
    assert torch.equal(_theta(resumed), _theta(whole))  # and continues exactly
    with pytest.raises(ValueError, match="steps, a budget_s"):
        MetaConfig(steps=None)
    with pytest.raises(ValueError, match="budget_s"):
        MetaConfig(budget_s=-1.0)


def test_resume_is_bit_identical_and_refuses_another_family(tmp_path):
    family = _regression_family(horizon=6)  # unroll 4: a task is 2 truncations, the last one 2 steps
    cfg = MetaConfig(steps=6, pairs=2, unroll=4, rule=SMALL_RULE)
    full, _ = meta_train(cfg, family)
    meta_train(MetaConfig(**{**cfg.__dict__, "steps": 2}), family, out=tmp_path, checkpoint_every=1)
    resumed, hist = meta_train(cfg, family, out=tmp_path, checkpoint_every=1)
    assert len(hist) == 6 and torch.equal(_theta(full), _theta(resumed))
    with pytest.raises(CheckpointError, match="task family 'user-regression'.*not on task family 'other'"):
        meta_train(cfg, _regression_family(horizon=6, name="other"), out=tmp_path)
    with pytest.raises(CheckpointError, match="spec hash"):  # same name, another architecture
        meta_train(cfg, _regression_family(hidden=8, horizon=6), out=tmp_path)
    with pytest.raises(CheckpointError, match="not on the MLP task mix"):
        meta_train(cfg, out=tmp_path)
    with pytest.raises(TypeError, match="out="):  # the old positional out= is caught
        meta_train(cfg, tmp_path)


def test_validation_keeps_the_best_rule_on_held_out_tasks_and_resumes(tmp_path, monkeypatch):
    """``validate_every``: the rule is scored on held-out seeds (never meta-trained on) before the first step, every
    K steps and after the last; the result is the best-scored rule, not the last (here a meta-gradient pointing the
    wrong way, as a noisy PES estimate can, makes the rule worse, so the starting one is kept), and a resumed run
    keeps the best of the steps before it."""
    family = _regression_family(horizon=4)
    cfg = MetaConfig(steps=6, pairs=2, unroll=2, outer_lr=0.5, sigma=0.05, rule=SMALL_RULE, validate_every=2)
    torch.manual_seed(cfg.seed)
    start = LearnedRule(RuleConfig(**SMALL_RULE))  # the rule meta_train builds from this seed
    ascent = meta.es_gradient
    with monkeypatch.context() as m:
        m.setattr(meta, "es_gradient", lambda *a: -ascent(*a))
        rule, hist = meta_train(cfg, family)
        meta_train(MetaConfig(**{**cfg.__dict__, "steps": 4}), family, out=tmp_path / "a", checkpoint_every=1)
        again, _ = meta_train(cfg, family, out=tmp_path / "a", checkpoint_every=1)
    assert torch.equal(_theta(again), _theta(start))  # the best, from before the resume, survives it
    held = meta.validation_tasks(cfg, family)
    assert [t.seed for t in held] == [meta.VALIDATION_SEED, meta.VALIDATION_SEED + 1]
    assert not {t.seed for t in held} & {h["task"]["seed"] for h in hist}
    assert [h["step"] for h in hist if "valid_loss" in h] == [2, 4, 6] and "valid_loss_start" in hist[0]
    scores = [hist[0]["valid_loss_start"]] + [h["valid_loss"] for h in hist if "valid_loss" in h]
    assert scores[0] < min(scores[1:])  # the meta-training made it worse ...
    assert torch.equal(_theta(rule), _theta(start))  # ... so the starting rule is returned
    params = {n: p.detach()[None] for n, p in rule.named_parameters()}
    assert meta.validation_loss(cfg, rule, params, held) == pytest.approx(scores[0], rel=1e-6)
    # the true meta-gradient improves it: a later rule is kept, and resuming keeps the best of the first part
    gentle = cfg
    best, h_full = meta_train(gentle, family)
    kept = min([(h_full[0]["valid_loss_start"], 0)] + [(h["valid_loss"], h["step"]) for h in h_full
                                                       if "valid_loss" in h])
    assert kept[1] > 0
    meta_train(MetaConfig(**{**gentle.__dict__, "steps": 4}), family, out=tmp_path / "b", checkpoint_every=1)
    resumed, h_res = meta_train(gentle, family, out=tmp_path / "b", checkpoint_every=1)
    assert torch.equal(_theta(resumed), _theta(best)) and len(h_res) == 6
    with pytest.raises(ValueError, match="validate_every"):
        MetaConfig(validate_every=-1)


def test_rollback_restarts_from_the_best_rule_at_half_the_outer_rate_and_resumes(tmp_path, monkeypatch):
    """``rollback``: a validation score more than ``rollback`` above the best sends the meta-parameters back to the
    best rule, restarts the outer Adam at half its rate and starts a new inner task (here a wrong-way meta-gradient
    makes every step worse); the next outer step then moves the rule by at most the halved rate per entry (a fresh
    Adam's first step), and a resumed run rolls back at the same steps with the same rates."""
    family = _regression_family(horizon=4)
    cfg = MetaConfig(steps=6, pairs=2, unroll=2, outer_lr=0.5, sigma=0.05, rule=SMALL_RULE, validate_every=1,
                     rollback=1e-9)
    seen = []
    score = meta.validation_loss

    def recording(cfg_, rule_, params, tasks, compiled=None, scales=None):
        seen.append(torch.cat([p.reshape(-1) for p in params.values()]).clone())
        return score(cfg_, rule_, params, tasks, compiled, scales)

    ascent = meta.es_gradient
    with monkeypatch.context() as m:
        m.setattr(meta, "es_gradient", lambda *a: -ascent(*a))
        m.setattr(meta, "validation_loss", recording)
        rule, hist = meta_train(cfg, family)
        thetas = list(seen)
        meta_train(MetaConfig(**{**cfg.__dict__, "steps": 3}), family, out=tmp_path / "a", checkpoint_every=1)
        again, h_again = meta_train(cfg, family, out=tmp_path / "a", checkpoint_every=1)
    rolls = [(h["step"], h["rollback"]) for h in hist if "rollback" in h]
    assert rolls and rolls[0] == (1, {"to_step": 0, "outer_lr": 0.25})  # step 1 is worse than the start
    assert [r["outer_lr"] for _, r in rolls] == [0.5 * 0.5 ** (i + 1) for i in range(len(rolls))]
    # validations see theta_0 (start), theta_1 (worse: rolled back), then one fresh-Adam step from theta_0
    step2 = (thetas[2] - thetas[0]).abs().max()
    assert 0 < step2 <= 0.25 * (1 + 1e-5) and (thetas[1] - thetas[0]).abs().max() > 0.25 * (1 + 1e-5)
    scores = [hist[0]["valid_loss_start"]] + [h["valid_loss"] for h in hist]
    assert len(scores) == len(thetas) == 7
    assert torch.equal(_theta(rule), thetas[min(range(7), key=scores.__getitem__)])  # the best-scored rule
    assert [h.get("rollback") for h in h_again] == [h.get("rollback") for h in hist]
    assert torch.equal(_theta(again), _theta(rule))
    with pytest.raises(ValueError, match="rollback"):
        MetaConfig(rollback=1.0)  # acts on validation scores: needs validate_every


def test_a_checkpoint_from_before_a_new_setting_resumes_with_its_default(tmp_path):
    """A run directory written before ``MetaConfig`` gained a field (here ``rollback``) resumes: the missing field
    counts at its default; a stored value that differs from this run's still refuses."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    family = _regression_family(horizon=4)
    cfg = MetaConfig(steps=2, pairs=2, unroll=2, rule=SMALL_RULE)
    meta_train(cfg, family, out=tmp_path, checkpoint_every=1)
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        md, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old = json.loads(md["config"])
    del old["rollback"]
    save_file(tensors, str(path), metadata={**md, "config": json.dumps(old)})
    _, hist = meta_train(MetaConfig(**{**cfg.__dict__, "steps": 4}), family, out=tmp_path, checkpoint_every=1)
    assert len(hist) == 4
    with pytest.raises(CheckpointError, match="other settings"):
        meta_train(MetaConfig(**{**cfg.__dict__, "steps": 6, "pairs": 3}), family, out=tmp_path)


def test_fingerprint_names_what_the_rule_depends_on():
    a, b = _regression_family(), _regression_family()
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != _regression_family(hidden=8).fingerprint()
    assert a.fingerprint() != _regression_family(horizon=9).fingerprint()


def test_exact_variant_on_a_family_learns_for_its_architecture():
    family = _regression_family()
    cfg = MetaConfig(steps=1, pairs=1, unroll=4, rule=dict(SMALL_RULE, variant="unf-exact"))
    rule, _ = meta_train(cfg, family)
    assert rule.spec == family.spec()


def test_train_curve_uses_the_family_loss_and_reports_accuracy_for_classification_only():
    family = _regression_family()
    r = train_curve(family, lambda m, x: torch.optim.Adam(m.parameters(), lr=3e-2), seed=0, eval_every=20,
                    steps=100)
    assert r["test_acc"] is None and r["train"][-1] < 0.5 * r["train"][0]
    x = family.data()[0]
    torch.manual_seed(0)
    with torch.no_grad():  # the curve starts at the family's loss of the seed's initialisation
        assert r["train"][0] == pytest.approx(float(F.mse_loss(family.model(0)(x), family.data()[1])), rel=1e-6)
    c = train_curve(TASKS["breast-cancer-mlp"], lambda m, x: torch.optim.Adam(m.parameters()), seed=0, steps=5)
    assert 0 <= c["test_acc"] <= 1


def test_cosine_schedule_decays_the_rate_to_zero_over_the_steps():
    opts = []

    def make(m, x):
        opts.append(torch.optim.SGD(m.parameters(), lr=0.1))
        return opts[-1]

    family = _regression_family()
    const = train_curve(family, make, seed=0, steps=20, eval_every=20)
    cos = train_curve(family, make, seed=0, steps=20, eval_every=20, schedule="cosine")
    assert opts[0].param_groups[0]["lr"] == 0.1 and opts[1].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert const["train"][0] == cos["train"][0] and const["train"][-1] != cos["train"][-1]
    with pytest.raises(ValueError, match="schedule 'linear'"):
        train_curve(family, make, seed=0, steps=2, schedule="linear")


def test_bad_families_are_named():
    x, y = torch.randn(10, 5), torch.randn(10, 1)
    with pytest.raises(ValueError, match="'bad'.*x_train has 10 rows and y_train 9"):
        TaskFamily(TwoLayer, (x, y[:9], x, y), F.mse_loss, 4, 10, name="bad")
    with pytest.raises(ValueError, match="x_test is a list"):
        TaskFamily(TwoLayer, (x, y, [1], y), F.mse_loss, 4, 10, name="bad")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TaskFamily(TwoLayer, (x, y, x, y), F.mse_loss, 0, 10)
    lazy = TaskFamily(TwoLayer, lambda: (x, y), F.mse_loss, 4, 10, name="lazy")
    with pytest.raises(ValueError, match="'lazy'.*got tuple of length 2"):
        lazy.data()
    broken = TaskFamily(TwoLayer, lambda: open("/nonexistent/unf-data"), F.mse_loss, 4, 10, name="broken")
    with pytest.raises(ValueError, match="'broken': loading its data failed"):
        broken.data()
    with pytest.raises(TypeError, match=r"model\(0\) returned int"):
        TaskFamily(lambda seed: 3, (x, y, x, y), F.mse_loss, 4, 10).build(0)
    with pytest.raises(ValueError, match="longer than task family"):
        meta_train(MetaConfig(steps=1, unroll=20, rule=SMALL_RULE), _regression_family(horizon=8))


TASK_FILE = """\
import torch, torch.nn as nn, torch.nn.functional as F
from unf.optim import TaskFamily


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x[:150], y[:150], x[150:], y[150:]


def family():
    return TaskFamily(lambda seed: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), data,
                      F.cross_entropy, batch_size=16, horizon=4)


def not_a_family():
    return nn.Linear(2, 2)
"""


def test_cli_meta_trains_and_evaluates_a_task_file(tmp_path, capsys):
    task = tmp_path / "my_task.py"
    task.write_text(TASK_FILE)
    out = tmp_path / "run"
    argv = ["lopt", "meta-train", "--task", f"{task}:family", "--out", str(out), "--variant", "mlp", "--pairs", "1",
            "--unroll", "2", "--json"]
    assert main([*argv, "--steps", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["steps"] == 2 and row["task"] == f"{task.resolve()}:family"
    assert json.loads((out / "run.json").read_text())["task"] == row["task"]
    assert main([*argv, "--steps", "4"]) == 0  # resumes
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    # the same directory with another task is refused, naming --out and the family it was written for
    _user_error(capsys, [*argv[:2], "--task", "digits-mlp", *argv[4:], "--steps", "6"], "--out", "family")
    assert main(["lopt", "eval", "--task", f"{task}:family", "--weights", str(out), "--adam-lrs", "1e-2",
                 "--sgd-lrs", "0.1", "--seed", "1", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["task"] == row["task"] and 0 <= ev["test_acc"] <= 1
    assert ev["best_adam"] in ("adam lr=0.01", "adam lr=0.01 cosine")  # the better of constant and cosine
    assert ev["best_sgdm"] in ("sgdm lr=0.1", "sgdm lr=0.1 cosine") and ev["speedup_train_vs_sgdm"] >= 0


def test_cli_validation_reports_the_kept_rule(tmp_path, capsys):
    task = tmp_path / "my_task.py"
    task.write_text(TASK_FILE)
    out = tmp_path / "run"
    assert main(["lopt", "meta-train", "--task", f"{task}:family", "--out", str(out), "--variant", "mlp", "--pairs",
                 "1", "--unroll", "2", "--steps", "2", "--validate-every", "1", "--validate-tasks", "1",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scores = [(log[0]["valid_loss_start"], 0)] + [(h["valid_loss"], h["step"]) for h in log]
    assert (row["valid_loss"], row["selected_step"]) == min(scores)


def test_cli_rollback_needs_validation_and_runs_with_it(tmp_path, capsys, monkeypatch):
    """``--rollback D`` acts on validation scores: without ``--validate-every`` it is a user error naming both;
    with it, a validation D worse than the best rolls back, and the log says so."""
    task = tmp_path / "my_task.py"
    task.write_text(TASK_FILE)
    base = ["lopt", "meta-train", "--task", f"{task}:family", "--variant", "mlp", "--pairs", "1", "--unroll", "2",
            "--steps", "2"]
    _user_error(capsys, base + ["--out", str(tmp_path / "a"), "--rollback", "1"], "--rollback", "validate_every")
    out = tmp_path / "b"
    scores = iter([0.0, 2.0, 0.5])  # start, step 1 (2 above the best: roll back), step 2
    monkeypatch.setattr(meta, "validation_loss", lambda *a, **k: next(scores))
    assert main(base + ["--out", str(out), "--validate-every", "1", "--validate-tasks", "1", "--rollback", "1"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h.get("rollback") for h in log] == [{"to_step": 0, "outer_lr": 1.5e-3}, None]


def test_cli_budget_alone_stops_meta_training(tmp_path, capsys):
    """``--budget-min`` without ``--steps``: the run ends once the budget is spent (a few steps here, not 2,000)."""
    task = tmp_path / "my_task.py"
    task.write_text(TASK_FILE)
    out = tmp_path / "run"
    assert main(["lopt", "meta-train", "--task", f"{task}:family", "--out", str(out), "--variant", "mlp", "--pairs",
                 "1", "--unroll", "2", "--budget-min", "0.001", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 1 <= row["steps"] < 2000 and row["minutes"] >= 0.001
    assert json.loads((out / "run.json").read_text())["config"]["budget_s"] == pytest.approx(0.06)


@pytest.mark.parametrize("ref, needles", [
    ("{tmp}/missing.py:family", ["--task", "task file", "does not exist"]),
    ("{task}:not_a_family", ["--task", "returned Linear, not a unf.optim.TaskFamily"]),
    ("{task}:nothing", ["--task", "has no callable 'nothing'"]),
    ("{broken}:family", ["--task", "failed to import", "SyntaxError"]),
    ("no-such-family", ["--task", "not a built-in family", "digits-mlp"]),
])
@pytest.mark.parametrize("command", ["meta-train", "eval"])
def test_cli_refuses_a_bad_task(tmp_path, capsys, ref, needles, command):
    (tmp_path / "my_task.py").write_text(TASK_FILE)
    (tmp_path / "broken.py").write_text("def family(:\n")
    ref = ref.format(tmp=tmp_path, task=tmp_path / "my_task.py", broken=tmp_path / "broken.py")
    extra = ["--out", str(tmp_path / "run")] if command == "meta-train" else []
    _user_error(capsys, ["lopt", command, "--task", ref, *extra], *needles)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_cli_task_and_mix_options_exclude_each_other(tmp_path, capsys):
    _user_error(capsys, ["lopt", "meta-train", "--task", "digits-mlp", "--widths", "8", "--out", str(tmp_path / "r")],
                "--widths", "with --task")
    _user_error(capsys, ["lopt", "eval", "--seed", str(2 ** 30)], "--seed", "below 2**30")
    _user_error(capsys, ["lopt", "eval", "--schedules", "linear"], "--schedules")
    _user_error(capsys, ["lopt", "eval", "--sgd-lrs", "0"], "--sgd-lrs", "positive")


def test_builtin_families_resolve():
    fam = get_family("digits-mlp")
    assert (fam.batch_size, fam.horizon) == (64, 1000)
    assert [tuple(p.shape) for p in fam.build(0).parameters()] == [(128, 64), (128,), (128, 128), (128,), (10, 128),
                                                                   (10,)]
    assert get_family("majority-gru") is TASKS["majority-gru"]


@pytest.mark.parametrize("name, shapes", [
    ("digits-cnn-family", [(8, 1, 3, 3), (8,), (8, 8, 3, 3), (8,), (8, 8, 3, 3), (8,), (10, 8), (10,)]),
    ("majority-gru-family", [(6, 16), (96, 16), (96, 32), (96,), (96,), (2, 32), (2,)]),
])
def test_cnn_and_gru_families_build_meta_train_and_evaluate(name, shapes, capsys):
    """The two further built-in families: their fixed architecture and horizon, one outer step of meta-training (on
    a shortened copy: the same model, data and loss), a few evaluation steps, and the CLI lists them."""
    fam = get_family(name)
    assert name in FAMILIES and name not in TASKS and (fam.batch_size, fam.horizon) == (64, 500)
    assert [tuple(p.shape) for p in fam.build(0).parameters()] == shapes
    short = TaskFamily(fam.model, fam.data, fam.loss, fam.batch_size, 4, name=name)
    cfg = MetaConfig(steps=1, pairs=1, unroll=2, rule=SMALL_RULE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GRU's members run one by one (a warning says so)
        rule, history = meta_train(cfg, short)
    assert len(history) == 1 and math.isfinite(history[0]["meta_loss"])
    run = train_curve(fam, lambda m, x: UNFOptimizer.for_model(m, x, weights=rule), 0, eval_every=2, steps=4)
    assert len(run["train"]) == 3 and all(math.isfinite(v) for v in run["train"]) and 0 <= run["test_acc"] <= 1
    assert main(["lopt", "meta-train", "--help"]) == 0
    assert name in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn-family", "majority-gru-family"])
def test_exact_rule_from_a_shared_one_takes_the_same_steps(name):
    """``LearnedRule.exact_from``: the per-term rule for a family's spec starts as the shared rule (a warm start)."""
    from test_optim import _random_rule, _step_inputs

    from unf.optim import step_direction

    spec = get_family(name).spec()
    shared = _random_rule().double()
    exact = LearnedRule.exact_from(shared, spec)
    assert exact.config.variant == "unf-exact" and exact.spec == spec
    p, g, state = _step_inputs(spec, shared, torch.Generator().manual_seed(1))
    d1, s1 = step_direction(shared, shared.plan(spec), p, g, state, 7)
    d2, s2 = step_direction(exact, exact.plan(spec), p, g, state, 7)
    assert max(float(d1[n].abs().max()) for n in spec.float_names) > 1e-4
    assert max(float((d1[n] - d2[n]).abs().max()) for n in spec.float_names) < 1e-12
    with pytest.raises(ValueError, match="needs a shared 'unf' rule"):
        LearnedRule.exact_from(LearnedRule(variant="mlp"), spec)


def test_readme_example_runs(tmp_path, monkeypatch):
    """README's "Meta-train a learned optimizer for your own model": the task file and the script, with 2 outer steps
    instead of a 30-minute budget."""
    import re
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Meta-train a learned optimizer for your own model"):]
    task_file, script = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    (tmp_path / "my_task.py").write_text(task_file)
    budget = "MetaConfig(steps=None, budget_s=30 * 60)"
    assert budget in script
    script = script.replace(budget, "MetaConfig(steps=2, pairs=1)").replace('"runs/mine"', repr(str(tmp_path / "r")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_task", raising=False)
    scope = {}
    exec(compile(script, "README", "exec"), scope)
    assert len(scope["history"]) == 2 and (tmp_path / "r" / "rule.safetensors").is_file()
    assert scope["fam"].name == "my-regression" and scope["opt"].param_groups[0]["params"]


def test_a_mix_of_families_meta_trains_one_rule_on_all_and_resumes_only_as_that_mix(tmp_path):
    """``meta_train(cfg, [f1, f2])``: inner tasks come from both families (drawn per task), each at meta-training
    seeds; validation scores each family; resume is bit-identical and refuses another mix or a single family."""
    mix = [_regression_family(horizon=4, name="reg-a"), _regression_family(hidden=8, horizon=4, name="reg-b")]
    cfg = MetaConfig(steps=12, pairs=2, unroll=4, rule=SMALL_RULE, validate_every=6, validate_tasks=1)
    full, history = meta_train(cfg, mix)
    used = {h["task"]["family"] for h in history}
    assert used == {"reg-a", "reg-b"} and all(h["task"]["seed"] >= META_SEED_BASE for h in history)
    assert [t.task_family.name for t in meta.validation_tasks(cfg, mix)] == ["reg-a", "reg-b"]
    meta_train(MetaConfig(**{**cfg.__dict__, "steps": 5}), mix, out=tmp_path, checkpoint_every=1)
    resumed, _ = meta_train(cfg, mix, out=tmp_path, checkpoint_every=1)
    assert torch.equal(_theta(full), _theta(resumed))
    with pytest.raises(CheckpointError, match="the mix of 'reg-a', 'reg-b'.*not on task family 'reg-a'"):
        meta_train(cfg, mix[0], out=tmp_path)
    with pytest.raises(CheckpointError, match="not on the mix of 'reg-b', 'reg-a'"):
        meta_train(cfg, mix[::-1], out=tmp_path)
    with pytest.raises(ValueError, match="unf-exact"):
        meta_train(MetaConfig(steps=1, pairs=1, unroll=4, rule=dict(SMALL_RULE, variant="unf-exact")), mix)
    with pytest.raises(ValueError, match="twice"):
        meta_train(cfg, [mix[0], mix[0]])
    with pytest.raises(TypeError, match="non-empty list"):
        meta_train(cfg, [])
    # one family in a list is that family: the same task stream as passing it alone
    alone, h1 = meta_train(MetaConfig(steps=4, pairs=2, unroll=4, rule=SMALL_RULE), mix[0])
    listed, h2 = meta_train(MetaConfig(steps=4, pairs=2, unroll=4, rule=SMALL_RULE), [mix[0]])
    assert torch.equal(_theta(alone), _theta(listed)) and [h["task"] for h in h1] == [h["task"] for h in h2]


def test_broad_mix_leaves_the_held_out_tasks_out_and_the_cli_meta_trains_a_mix(tmp_path, capsys):
    from unf.optim.tasks import MIXES, get_families

    broad = MIXES["broad"]
    held = {t.fingerprint() for t in TASKS.values()} | {f.fingerprint() for f in FAMILIES.values()}
    assert len(broad) == 6 and not {f.fingerprint() for f in broad} & held  # other architectures, data or horizons
    assert [f.name for f in get_families("broad,digits-mlp")] == [f.name for f in broad] + ["digits-mlp"]
    assert get_family("parity-gru") is broad[-1]
    x, y = broad[-1].data()[:2]
    assert set(y.tolist()) == {0, 1} and torch.equal(y, ((x == 2).sum(1) % 2 == 0).long())
    task = tmp_path / "my_task.py"
    task.write_text(TASK_FILE)
    out = tmp_path / "run"
    assert main(["lopt", "meta-train", "--task", f"iris-mlp-32,{task}:family", "--out", str(out), "--variant", "mlp",
                 "--pairs", "1", "--unroll", "2", "--steps", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["task"] == f"iris-mlp-32,{task.resolve()}:family" and row["steps"] == 3
    _user_error(capsys, ["lopt", "meta-train", "--task", "iris-mlp-32,iris-mlp-32", "--out", str(tmp_path / "r2")],
                "--task", "more than once")
    _user_error(capsys, ["lopt", "meta-train", "--task", "broad", "--variant", "unf-exact", "--out",
                         str(tmp_path / "r3")], "unf-exact", "mix")


@pytest.mark.parametrize("whole", [True, False], ids=["whole-graph", "raw-features"])
def test_compiled_meta_training_matches_eager_and_falls_back(monkeypatch, whole):
    """``meta_train(compile=True)`` runs the rule compiled (one graph for the meta-training members, one for
    validation's single member; above ``WHOLE_GRAPH_ENTRIES`` with the features raw) and takes the
    same outer steps as eager to float rounding; a compiler failure warns and continues eagerly."""
    import torch._dynamo as dynamo

    from unf.optim import rule as rule_module

    if not whole:
        monkeypatch.setattr(rule_module, "WHOLE_GRAPH_ENTRIES", 0)

    family = _regression_family(horizon=4)
    cfg = MetaConfig(steps=3, pairs=2, sigma=0.05, unroll=2, outer_lr=0.1, rule=dict(SMALL_RULE), validate_every=2,
                     validate_tasks=1)
    eager, h_eager = meta_train(cfg, family)
    dynamo.reset()
    compiled, h_comp = meta_train(cfg, family, compile=True)
    for a, b in zip(h_eager, h_comp):
        assert b["meta_loss"] == pytest.approx(a["meta_loss"], rel=1e-4, abs=1e-6)
        assert b.get("valid_loss", 0.0) == pytest.approx(a.get("valid_loss", 0.0), rel=1e-4, abs=1e-6)
    # the outer Adam step normalises the ES gradient, so rounding in the members' losses moves a near-zero component
    # by up to its step (lr 0.1): 1e-3 is 1 % of one step
    for pa, pb in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-3)

    def broken(*args, **kw):
        raise RuntimeError("inductor: no C++ compiler")

    real_init = rule_module.CompiledRule.__init__

    def init(self):
        real_init(self)
        self.whole.compiled = self.head.compiled = broken

    monkeypatch.setattr(rule_module.CompiledRule, "__init__", init)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*eagerly"):
        fallback, h_fb = meta_train(cfg, family, compile=True)
    assert [h["meta_loss"] for h in h_fb] == [h["meta_loss"] for h in h_eager]


def test_tuned_adam_rule_takes_adams_steps_at_the_rate_best_on_held_out_seeds(monkeypatch):
    """The start of ``--start adam``: a new rule (zero learned term) with alpha = the grid's best constant Adam rate
    on the held-out validation seeds (never evaluation or meta-training seeds); its steps are Adam's."""
    family = _regression_family(horizon=20)
    seen = []
    real = meta.train_curve
    monkeypatch.setattr(meta, "train_curve", lambda f, make, seed, **k: seen.append(seed) or real(f, make, seed, **k))
    rule, lr = meta.tuned_adam_rule(family, dict(SMALL_RULE), lrs=(1e-5, 3e-2, 1e3), tasks=2)
    assert lr == 3e-2 and rule.log_alpha.exp().item() == pytest.approx(3e-2)  # 1e-5 barely moves, 1e3 diverges
    assert set(seen) == {meta.VALIDATION_SEED, meta.VALIDATION_SEED + 1} and len(seen) == 3 * 2
    torch.manual_seed(0)
    a, b = TwoLayer(), TwoLayer()
    b.load_state_dict(a.state_dict())
    x, y = _regression_data()[:2]
    adam, learned = torch.optim.Adam(a.parameters(), lr=lr), UNFOptimizer.for_model(b, x[:1], weights=rule)
    for _ in range(5):
        for model, opt in ((a, adam), (b, learned)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="needs a task family"):
        meta.tuned_adam_rule(None)


def test_loss_floor_sets_where_the_meta_loss_stops_seeing_progress():
    """The log meta-loss clamps loss / initial loss at ``loss_floor``: with the default 1e-3 an inner task that is
    below it scores log(1e-3) (as far as the meta-loss can see), with 1e-12 it scores its own log ratio."""
    family = _regression_family(horizon=40)
    task = FamilyTask(family, META_SEED_BASE)
    scores = {}
    for floor in (1e-3, 1e-12):
        cfg = MetaConfig(steps=1, rule=dict(SMALL_RULE, alpha=3e-2), loss_floor=floor, unroll=4)
        rule = LearnedRule(RuleConfig(**cfg.rule))
        inner = _Inner(task, cfg, rule, 0, 0)
        inner.unroll(rule, None, 1, cfg.loss_clip, True, floor=floor)
        inner.loss0 *= 1e8  # as if the task had trained to 1e-8 of its initial loss
        scores[floor] = float(inner.unroll(rule, None, 1, cfg.loss_clip, True, floor=floor)[0])
    assert scores[1e-3] == pytest.approx(math.log(1e-3)) and math.log(1e-9) < scores[1e-12] < math.log(1e-7)
    with pytest.raises(ValueError, match="loss_floor"):
        MetaConfig(loss_floor=0.0)


def test_adam_loss_scale_puts_every_family_in_units_of_tuned_adam_and_resumes(tmp_path, monkeypatch):
    """``loss_scale="adam"``: each family's meta-loss is divided by minus tuned Adam's whole-horizon meta-loss on its
    validation seeds, so tuned Adam scores exactly -1 on a family where it gains more than e-fold; a family where it
    gains less keeps raw units (never enlarged). The scales are measured once, logged with step 1 and read back on
    resume (not measured again); the setting is refused without families or with the plain-ratio meta-loss."""
    mix = [_regression_family(horizon=40, name="reg-a"), _regression_family(hidden=4, horizon=120, name="reg-b")]
    cfg = MetaConfig(steps=12, pairs=2, unroll=4, rule=SMALL_RULE, validate_every=4, validate_tasks=1,
                     loss_scale="adam", loss_floor=1e-6)
    scales = meta.adam_scales(cfg, mix)
    raws = {}
    for f in mix:
        rule, _ = meta.tuned_adam_rule(f, dict(SMALL_RULE), tasks=1)
        params = {n: p.detach()[None] for n, p in rule.named_parameters()}
        tasks = [FamilyTask(f, meta.VALIDATION_SEED)]
        raws[f.name] = meta.validation_loss(cfg, rule, params, tasks)
        scaled = meta.validation_loss(cfg, rule, params, tasks, scales=scales)
        assert scaled == pytest.approx(raws[f.name] / scales[f.name])
    assert raws["reg-b"] < -1 and scales["reg-b"] == pytest.approx(-raws["reg-b"])  # tuned Adam scores -1 there
    assert -1 < raws["reg-a"] < 0 and scales["reg-a"] == meta.MIN_SCALE == 1.0  # not enlarged
    full, history = meta_train(cfg, mix)
    assert history[0]["loss_scales"] == pytest.approx(scales)
    assert all("loss_scales" not in h for h in history[1:])
    meta_train(MetaConfig(**{**cfg.__dict__, "steps": 10}), mix, out=tmp_path, checkpoint_every=1)
    assert meta.checkpoint_history(tmp_path)  # the first task (reg-a, 10 truncations) ended: a checkpoint to resume
    monkeypatch.setattr(meta, "adam_scales", lambda *a, **k: pytest.fail("measured again on resume"))
    resumed, _ = meta_train(cfg, mix, out=tmp_path, checkpoint_every=1)
    assert torch.equal(_theta(full), _theta(resumed))
    with pytest.raises(ValueError, match="loss_scale 'adam'.*needs families"):
        meta_train(MetaConfig(steps=1, pairs=1, unroll=4, rule=SMALL_RULE, loss_scale="adam"))
    with pytest.raises(ValueError, match="log_loss"):
        MetaConfig(loss_scale="adam", log_loss=False)
    with pytest.raises(ValueError, match="loss_scale 'x'"):
        MetaConfig(loss_scale="x")


def test_cli_loss_scale_needs_a_task_and_reports_the_scales(tmp_path, capsys):
    task = tmp_path / "my_task.py"
    task.write_text(TASK_FILE)
    base = ["lopt", "meta-train", "--pairs", "1", "--unroll", "2", "--steps", "2", "--loss-scale", "adam"]
    _user_error(capsys, base + ["--out", str(tmp_path / "a")], "--loss-scale", "needs families")
    assert main(base + ["--out", str(tmp_path / "b"), "--task", f"{task}:family", "--variant", "mlp"]) == 0
    first = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[0])
    (name, scale), = first["loss_scales"].items()  # one family, named by its file and function
    assert name.endswith("my_task.py:family") and scale >= meta.MIN_SCALE


def test_cli_start_options(tmp_path, capsys, monkeypatch):
    """``--start adam`` needs a family and starts from tuned Adam; ``--start FILE`` loads a rule of --variant;
    anything else is a user error naming --start."""
    task = tmp_path / "my_task.py"
    task.write_text(TASK_FILE)
    base = ["lopt", "meta-train", "--pairs", "1", "--unroll", "2", "--steps", "1", "--json"]
    _user_error(capsys, base + ["--out", str(tmp_path / "a"), "--start", "adam"], "--start adam", "--task")
    _user_error(capsys, base + ["--out", str(tmp_path / "b"), "--start", str(tmp_path / "none.safetensors")],
                "--start", "not 'new', 'adam'")
    shipped = LearnedRule.load(Path(DEFAULT_WEIGHTS).parent / "mlp.safetensors")
    shipped.save(tmp_path / "mlp.safetensors")
    _user_error(capsys, base + ["--out", str(tmp_path / "c"), "--start", str(tmp_path / "mlp.safetensors")],
                "--start", "'mlp' rule", "--variant is 'unf'")
    monkeypatch.setattr(meta, "tuned_adam_rule", lambda fam, rule, **k: (LearnedRule(RuleConfig(**{
        **rule, "alpha": 0.02})), 0.02))
    out = tmp_path / "d"
    assert main(base + ["--task", f"{task}:family", "--variant", "mlp", "--out", str(out), "--start", "adam",
                        "--loss-floor", "1e-6"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["start"] == "adam" and run["config"]["loss_floor"] == 1e-6
    assert LearnedRule.load(out / "rule.safetensors").log_alpha.exp().item() == pytest.approx(0.02, rel=0.05)
