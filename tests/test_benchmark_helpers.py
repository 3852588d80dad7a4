"""The helpers behind the README's tables (benchmarks/distillation_results.py, benchmarks/detector_kd_results.py,
benchmarks/optimizer_step.py)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from distillation_results import bootstrap_gap_sd, cut_noise, overlap, shared_with_teacher  # noqa: E402
from detector_kd_results import command  # noqa: E402
from optimizer_step import cases, torch_optimizer  # noqa: E402

from ddkit.engine.train import _optimizer  # noqa: E402
from ddkit.engine.train_config import parse_train_config  # noqa: E402


def _teacher_of(cmd: list[str]) -> str | None:
    found = [a.split("=", 1)[1] for a in cmd if a.startswith("teacher.checkpoint=")]
    assert len(found) <= 1
    return found[0] if found else None


def test_detector_kd_seed_0_trains_the_teacher_that_the_other_seeds_load():
    assert _teacher_of(command("configs/r.yaml", 0, [])) is None
    seed0 = Path(__file__).resolve().parents[1] / "runs" / "r" / "seed0" / "teacher" / "model.pt"
    assert _teacher_of(command("configs/r.yaml", 2, [])) == str(seed0)


def test_detector_kd_out_option_moves_every_seed_and_the_teacher_seed_0_trains():
    root = Path(__file__).resolve().parents[1] / "runs" / "det_kd_300"
    cmd = command("configs/r.yaml", 1, ["x=1"], out_root="runs/det_kd_300")
    assert f"run.out_dir={root / 'seed1'}" in cmd and cmd.index("x=1") > cmd.index(f"run.out_dir={root / 'seed1'}")
    assert _teacher_of(cmd) == str(root / "seed0" / "teacher" / "model.pt")


def test_detector_kd_teacher_option_teaches_every_seed_seed_0_included():
    for seed in (0, 1, 3):
        assert _teacher_of(command("configs/r.yaml", seed, ["x=1"], "/t/model.pt")) == "/t/model.pt"


def test_shared_with_teacher_counts_a_models_mistakes_the_teacher_makes_too():
    teacher = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    student = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    full = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert shared_with_teacher({"teacher": teacher, "student": student}, "student") == "1/2"
    assert shared_with_teacher({"teacher": teacher, "student": torch.zeros(6, dtype=torch.bool)}, "student") == "0/0"
    assert overlap({"teacher": teacher, "student": student, "full": full}) == "1/2 (2/5)"


def test_bootstrap_gap_sd_is_zero_when_every_resample_closes_the_same_share():
    # the student makes exactly the upper bound's mistakes: every resample closes 100 % of the gap
    base = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0] * 50, dtype=torch.bool)
    full = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0] * 50, dtype=torch.bool)
    assert bootstrap_gap_sd({"teacher": base, "student": full, "full": full}) == 0.0


def test_bootstrap_gap_sd_matches_a_slow_reference():
    g = torch.Generator().manual_seed(1)
    wrong = {k: torch.rand(300, generator=g) < p for k, p in (("teacher", 0.3), ("student", 0.2), ("full", 0.1))}
    g = torch.Generator().manual_seed(0)  # the helper's own resamples
    idx = torch.randint(300, (1000, 300), generator=g)
    gaps = []
    for row in idx.tolist():
        b, s, f = (sum(bool(wrong[k][i]) for i in row) for k in ("teacher", "student", "full"))
        if b != f:
            gaps.append((b - s) / (b - f))
    gaps.sort()
    lo, hi = torch.quantile(torch.tensor(gaps, dtype=torch.float64), torch.tensor([0.16, 0.84], dtype=torch.float64))
    assert abs(bootstrap_gap_sd(wrong) - 100 * float(hi - lo) / 2) < 1e-4  # float32 means


def test_cut_noise_is_the_spread_of_the_relative_cut_over_the_same_resamples():
    g = torch.Generator().manual_seed(2)
    alone, kd = torch.rand(300, generator=g) < 0.3, torch.rand(300, generator=g) < 0.2
    g = torch.Generator().manual_seed(0)  # the helper's own resamples
    idx = torch.randint(300, (1000, 300), generator=g)
    cuts = [(sum(bool(alone[i]) for i in row) - sum(bool(kd[i]) for i in row)) / sum(bool(alone[i]) for i in row)
            for row in idx.tolist()]
    lo, hi = torch.quantile(torch.tensor(cuts, dtype=torch.float64), torch.tensor([0.16, 0.84], dtype=torch.float64))
    assert abs(cut_noise(alone, kd) - 100 * float(hi - lo) / 2) < 1e-4
    assert cut_noise(alone, alone) == 0.0


def test_optimizer_step_compares_like_with_like():
    """The benchmark's torch optimizers take ddkit's hyper-parameters from each recipe; only the kernel differs."""
    for recipe, _, name, block in cases():
        cfg = parse_train_config({**block, "fused": True})
        params = [torch.nn.Parameter(torch.ones(3))]
        ours = _optimizer(cfg, params, 100)[0]
        assert type(ours).__name__.lower() == name and ours.defaults["fused"] is True, recipe
        for foreach in (None, True):
            theirs = torch_optimizer(cfg, params, foreach)
            assert type(theirs) is type(ours)
            differ = {k for k, v in ours.defaults.items() if theirs.defaults.get(k) != v}
            assert differ == {"fused", "foreach"} - ({"foreach"} if foreach is None else set()), (recipe, differ)


def test_the_plain_scripts_split_the_digits_as_their_recipes_do():
    """Side by side, the plain scripts and ddkit must see the same labeled, unlabeled and test digits."""
    import plain_mnist_dd
    import plain_mnist_kd
    from distillation_results import recipe_split

    assert recipe_split("dd") == plain_mnist_dd.SPLIT and recipe_split("kd") == plain_mnist_kd.SPLIT


def test_a_kept_plain_result_of_another_split_is_run_again(tmp_path, monkeypatch):
    import json
    import subprocess

    import distillation_results as dr

    saved = tmp_path / "runs" / "plain_mnist_kd" / "seed0.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({"seed": 0, "split": [0.8, 0.0, 0.2], "wrong": {}}))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"split": dr.recipe_split("kd"), "wrong": {}}))

    monkeypatch.setattr(dr, "REPO", tmp_path)
    monkeypatch.setattr(dr, "recipe_split", lambda key: [0.2, 0.6, 0.2])
    monkeypatch.setattr(dr.subprocess, "run", fake_run)
    assert dr.run_plain("kd", 0)["split"] == [0.2, 0.6, 0.2] and len(calls) == 1  # the old split's result: re-run
    assert dr.run_plain("kd", 0)["split"] == [0.2, 0.6, 0.2] and len(calls) == 1  # its own: kept
