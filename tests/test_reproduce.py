"""scripts/reproduce.py: results/ entries from runs, and the README block generated from them (and tested to agree)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import reproduce  # noqa: E402
from test_compare import fake_run  # noqa: E402


# ---------------------------------------------------------------- the committed README and results/
def test_readme_results_block_is_what_results_generates():
    """The README's results section is regenerated from the committed results/, whatever is there:
    a hand-edited figure, or an entry added without regenerating, fails here."""
    assert reproduce.readme_disagrees(REPO / "results", REPO / "README.md", REPO / "docs" / "results.png") is None
    for entry in reproduce.load_entries(REPO / "results"):  # every committed entry is a full one
        assert entry["per_episode"]["episode"] and entry["machine"]["cpu"] and entry["budget"]["steps"], entry["name"]
        assert (REPO / "conf" / "experiment" / f"{entry['experiment']}.yaml").is_file(), entry["name"]


# ---------------------------------------------------------------- the generator, on fixture entries
def fixture_entry(
    name: str, algorithm: str, values: list[float], eval_seed: int = 0, paper_value: float = 98.8
) -> dict:
    mean = sum(values) / len(values)
    identity = {
        "dataset": {"name": "omniglot", "protocol": "vinyals", "image_size": 28},
        "split": "test",
        "eval_seed": eval_seed,
        "test_ways": 5,
        "test_shots": 1,
        "test_queries": 15,
    }
    return {
        "name": name,
        "experiment": f"{algorithm}_omniglot_5w1s",
        "overrides": [f"experiment={algorithm}_omniglot_5w1s"],
        "variant": [],
        "budget_overrides": [],
        "setting": {"algorithm": algorithm, "dataset": "omniglot"},
        "metric": "test/acc",
        "metrics": {"test/acc": {"mean": mean, "ci95": 0.01, "episodes": len(values)}},
        "per_episode": {
            "source": "recorded by the run",
            "episodes": identity,
            "episode": list(range(len(values))),
            "values": {"acc": values},
        },
        "budget": {"steps": 1500, "meta_batch_size": 1, "episodes": 1500, "wall_time_sec": 700.0},
        "paper": {
            "metric": "test/acc",
            "value": paper_value,
            "source": "x",
            "budget": {"episodes": 1000000, "note": "at most"},
        },
        "curve": {"tag": "val/acc", "step": [500, 1000, 1500], "value": [0.9, 0.95, 0.97], "ci95": [0.01, 0.01, 0.01]},
        "machine": {"cpu": "Test CPU", "cores": 2, "gpu": None},
        "software": {"torch": "2", "commit": "abc", "dirty": False},
        "provenance": "recorded by the run",
        "run_dir": "/nowhere",
        "tested_checkpoint": None,
    }


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A README with the generated block's markers, and an empty results/."""
    (tmp_path / "results").mkdir()
    (tmp_path / "README.md").write_text("# x\n\n## Results\n\n" + "\n".join(reproduce.MARKERS) + "\n\n## Next\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "reproduction.md").write_text("# y\n\n" + "\n".join(reproduce.DETAIL_MARKERS) + "\n")
    return tmp_path


def write_entries(results_dir: Path, *entries: dict) -> None:
    for entry in entries:
        (results_dir / f"{entry['name']}.json").write_text(reproduce.entry_json(entry))


def test_generated_block_holds_each_figure_budget_machine_and_the_paired_difference(repo_copy):
    # MAML's per-episode accuracies minus ProtoNet's: 0, +0.2, −0.2 ... by hand: mean −0.04,
    # sd 0.1673 (differences 0, .2, -.2, 0, -.2), t(0.975, 4) = 2.7764, CI 2.7764·0.1673/√5 = 0.2078.
    protonet = fixture_entry("protonet_omniglot_5w1s", "protonet", [0.8, 0.8, 1.0, 0.6, 1.0])
    maml = fixture_entry("maml_omniglot_5w1s", "maml", [0.8, 1.0, 0.8, 0.6, 0.8], paper_value=98.7)
    other_episodes = fixture_entry("relationnet_omniglot_5w1s", "relationnet", [1.0, 1.0, 1.0, 0.8, 0.8], eval_seed=1)
    write_entries(repo_copy / "results", protonet, maml, other_episodes)
    plot = repo_copy / "docs" / "results.png"
    reproduce.regenerate(repo_copy / "results", repo_copy / "README.md", plot)
    readme = (repo_copy / "README.md").read_text()
    assert readme.startswith("# x\n\n## Results\n\n") and readme.endswith("\n\n## Next\n")  # the rest untouched
    # The protocol column: which class split the test episodes came from (the fixture's vinyals).
    rows = [line for line in readme.splitlines() if line.startswith("| maml_omniglot_5w1s | vinyals | test/acc")]
    assert rows[0] == (
        "| maml_omniglot_5w1s | vinyals | test/acc % | 80.00 ± 1.00 (5) | 98.70 | "
        "1,500 steps × 1 = 1,500 episodes, 12 min | 1,000,000 episodes (at most) | "
        "Test CPU, 2 cores |"
    )
    # The paired differences are in docs/reproduction.md's generated block, which the README links.
    details = (repo_copy / "docs" / "reproduction.md").read_text()
    assert details.startswith("# y\n\n") and "(docs/reproduction.md#the-reproduced-figures-in-detail)" in readme
    paired = [line for line in details.splitlines() if line.startswith("| maml_omniglot_5w1s | protonet")]
    assert paired == ["| maml_omniglot_5w1s | protonet_omniglot_5w1s | acc % | -4.00 ± 20.78 | 5 |"]
    # Runs on other episodes (eval_seed=1) are not paired with ProtoNet's.
    assert not any(line.startswith("| relationnet_omniglot_5w1s | protonet") for line in details.splitlines())
    assert "![Validation learning curves, the paper's figure dashed](docs/results.png)" in readme
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The agreement check: it holds now, and fails once an entry changes without regenerating.
    assert reproduce.readme_disagrees(repo_copy / "results", repo_copy / "README.md", plot) is None
    maml["metrics"]["test/acc"]["mean"] = 0.81
    write_entries(repo_copy / "results", maml)
    assert "differs from what" in reproduce.readme_disagrees(repo_copy / "results", repo_copy / "README.md", plot)
    reproduce.regenerate(repo_copy / "results", repo_copy / "README.md", plot)
    edited = details.replace("-4.00 ± 20.78", "-3.00 ± 20.78")  # a paired figure typed by hand
    (repo_copy / "docs" / "reproduction.md").write_text(edited)
    stale = reproduce.readme_disagrees(repo_copy / "results", repo_copy / "README.md", plot)
    assert "reproduction.md's results block differs from what" in stale


def test_runs_are_paired_at_the_same_test_time_inner_steps():
    """MAML tests after ten inner steps and, as a paper figure, after one; Meta-SGD after its one.
    The pair is MAML's one-step MSE against Meta-SGD's, never MAML's ten-step one."""

    def sinusoid(name: str, algorithm: str, steps: int, values: dict, evaluations: dict) -> dict:
        entry = fixture_entry(name, algorithm, [0.0])
        entry["setting"] = {"algorithm": algorithm, "dataset": "sinusoid", "eval_inner_steps": steps}
        entry["metric"] = "test/mse"
        entry["metrics"] = {
            metric: {"mean": sum(v) / len(v), "ci95": 0.1, "episodes": len(v)} for metric, v in values.items()
        }
        entry["per_episode"]["episode"] = [0, 1, 2]
        entry["per_episode"]["values"] = {reproduce.per_episode_key(m): v for m, v in values.items()}
        entry["paper"] = {"metric": "test/mse", "value": None, "evaluations": evaluations}
        return entry

    maml = sinusoid(
        "maml",
        "maml",
        10,
        {"test/mse": [0.1, 0.2, 0.3], "one_step/test/mse": [0.5, 0.6, 0.7]},
        {"one_step": ["eval_inner_steps=1"]},
    )
    metasgd = sinusoid("metasgd", "metasgd", 1, {"test/mse": [0.3, 0.3, 0.3]}, {})
    assert [(a["name"], m, b["name"], bm) for a, m, b, bm in reproduce.pairs([maml, metasgd])] == [
        ("maml", "one_step/test/mse", "metasgd", "test/mse")
    ]
    rows = [line for line in reproduce.pairwise_table([maml, metasgd]) if line.startswith("| maml")]
    assert rows == ["| maml | metasgd | mse, after 1 step | 0.30 ± 0.25 | 3 |"]


def test_an_empty_results_dir_says_so_in_the_readme(repo_copy):
    reproduce.regenerate(repo_copy / "results", repo_copy / "README.md", repo_copy / "results.png")
    assert "No reproduced results are committed yet" in (repo_copy / "README.md").read_text()
    assert not (repo_copy / "results.png").exists()


def test_a_variant_is_named_by_its_setting_overrides_not_its_budget():
    overrides = [
        "experiment=mann_omniglot_5w10i",
        "algorithm.add_vector=true",
        "trainer.max_steps=100",
        "test_episodes=1000",
        "trainer.enable_progress_bar=false",
        "hardware=cpu",
    ]
    assert reproduce.derive_name("mann_omniglot_5w10i", overrides) == "mann_omniglot_5w10i_add_vector-true"
    assert reproduce.derive_name("protonet_omniglot_5w1s", ["trainer.max_steps=50"]) == "protonet_omniglot_5w1s"


# ---------------------------------------------------------------- the command line, end to end
def reproduce_cli(*args: str, root: Path) -> subprocess.CompletedProcess:
    paths = [
        "--log-dir",
        str(root / "logs"),
        "--results-dir",
        str(root / "results"),
        "--readme-path",
        str(root / "README.md"),
        "--plot",
        str(root / "docs" / "results.png"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce.py"), *args, *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["maml_sinusoid_55shot"],
            "unknown experiment maml_sinusoid_55shot: no conf/experiment/maml_sinusoid_55shot.yaml",
        ),
        (["--collect", "nowhere"], "nowhere: no results.json (not a finished run)"),
        (["maml_sinusoid_5shot", "fomaml_sinusoid_5shot", "--name", "one"], "1 --name for 2 run(s)"),
        (["maml_sinusoid_5shot", "--name", "a/b"], "--name 'a/b' is not a file name"),
        (["maml_sinusoid_5shot", "--experiment", "maml_sinusoid_5shot"], "1 --experiment for 0 --collect run(s)"),
    ],
)
def test_bad_arguments_are_refused_in_one_line_before_any_run(repo_copy, args, message):
    finished = reproduce_cli(*args, root=repo_copy)
    assert finished.returncode == 2 and message in finished.stderr, finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1 and not (repo_copy / "logs").exists()


def test_collect_reads_a_finished_run_without_training(tmp_path):
    run_dir = fake_run(
        tmp_path / "run",
        ["experiment=maml_omniglot_5w1s", "algorithm.inner_lr=0.1", "trainer.max_steps=300", "test_episodes=5"],
        per_episode=[0.8, 1.0, 0.8, 0.6, 0.8],
    )
    entry = reproduce.collect(run_dir, None, tmp_path / "logs")
    assert entry["name"] == "maml_omniglot_5w1s_inner_lr-0.1" and entry["variant"] == ["algorithm.inner_lr=0.1"]
    assert entry["budget_overrides"] == ["trainer.max_steps=300"] and entry["budget"]["steps"] == 300
    # The paper's figure and budget come from the experiment file as it is now.
    assert entry["paper"]["value"] == 98.7 and entry["paper"]["budget"]["episodes"] == 1920000
    assert entry["per_episode"]["values"]["acc"] == [0.8, 1.0, 0.8, 0.6, 0.8]
    assert entry["curve"] == {
        "tag": "val/acc",
        "step": [100, 200, 300],
        "value": [0.5, 0.7, 0.8],
        "ci95": [0.05, 0.04, 0.03],
    }
    # A run that did not record its machine gets the collecting one's, and says so.
    assert entry["machine"]["cores"] >= 1 and entry["provenance"].startswith("not recorded by the run")
    assert not (tmp_path / "logs").exists()  # nothing was run


def test_a_resumed_run_counts_the_run_it_resumed_in_its_budget_and_curve(tmp_path):
    """A run resumed with ckpt_path=<earlier run>/checkpoints/last.ckpt trained from the earlier
    run's steps on: its entry's wall time and learning curve begin there, and the path is not a
    setting of the entry."""
    first = fake_run(tmp_path / "first", ["experiment=maml_omniglot_5w1s"], val=((100, 0.5, 0.05), (200, 0.6, 0.04)))
    resumed = fake_run(
        tmp_path / "resumed",
        ["experiment=maml_omniglot_5w1s", f"ckpt_path={first}/checkpoints/last.ckpt"],
        per_episode=[0.8, 1.0, 0.8, 0.6, 0.8],
        val=((300, 0.8, 0.03),),
    )
    entry = reproduce.collect(resumed, None, tmp_path / "logs")
    assert entry["name"] == "maml_omniglot_5w1s" and entry["overrides"] == ["experiment=maml_omniglot_5w1s"]
    assert entry["budget"]["wall_time_sec"] == 240.0 and entry["budget"]["resumed_from"] == ["first"]
    assert entry["curve"]["step"] == [100, 200, 300] and entry["curve"]["value"] == [0.5, 0.6, 0.8]
    # The first run stopped before it finished (SIGTERM): its steps and curve count, its time is unknown.
    (first / "results.json").unlink()
    entry = reproduce.collect(resumed, None, tmp_path / "logs")
    assert entry["budget"]["wall_time_sec"] is None and entry["budget"]["resumed_from"] == ["first"]
    assert entry["curve"]["step"] == [100, 200, 300] and "min" not in reproduce.our_budget(entry["budget"])
    shutil.rmtree(first)
    with pytest.raises(reproduce.ReproduceError, match="whose run directory .* is not at hand"):
        reproduce.collect(resumed, None, tmp_path / "logs")


def test_a_run_resumed_in_its_own_directory_is_collected_with_every_part_s_time(tmp_path):
    """This script resumes a killed run from the last.ckpt in its own directory, so the run's
    overrides name its own checkpoint: it is one run whose parts each logged event files there,
    and its time is theirs summed (its results.json has the last part's only)."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    fake_run(run, ["experiment=maml_omniglot_5w1s", f"ckpt_path={run}/checkpoints/last.ckpt"], per_episode=[1.0, 0.8])
    for start, end in ((1000.0, 1600.0), (5000.0, 5300.0)):  # two sessions, hours apart
        with SummaryWriter(str(run / "tensorboard")) as writer:
            writer.add_scalar("train/loss", 1.0, 1, walltime=start)
            writer.add_scalar("train/loss", 0.5, 2, walltime=end)
    entry = reproduce.collect(run, None, tmp_path / "logs")
    assert entry["name"] == "maml_omniglot_5w1s" and entry["overrides"] == ["experiment=maml_omniglot_5w1s"]
    assert entry["budget"]["wall_time_sec"] == 900.0, entry["budget"]  # not results.json's 120
    assert entry["budget"]["resumed_from"] == [] and entry["budget"]["resumed_in_place"] is True


def test_a_run_resumed_from_one_resumed_in_place_counts_every_part_of_it(tmp_path):
    """Training a finished run further into a new directory (a longer budget under its own name),
    when that run had itself been resumed in place: the earlier run is one run, its time its
    event files' span, not a loop of runs that cannot be collected."""
    from torch.utils.tensorboard import SummaryWriter

    first = tmp_path / "first"
    fake_run(first, ["experiment=maml_omniglot_5w1s", f"ckpt_path={first}/checkpoints/last.ckpt"])
    for start, end in ((1000.0, 1600.0), (5000.0, 5300.0)):  # two sessions of the first run
        with SummaryWriter(str(first / "tensorboard")) as writer:
            writer.add_scalar("train/loss", 1.0, 1, walltime=start)
            writer.add_scalar("train/loss", 0.5, 2, walltime=end)
    longer = fake_run(
        tmp_path / "longer",
        ["experiment=maml_omniglot_5w1s", f"ckpt_path={first}/checkpoints/last.ckpt"],
        per_episode=[1.0, 0.8],
        val=((400, 0.9, 0.02),),
    )
    entry = reproduce.collect(longer, None, tmp_path / "logs")
    assert entry["budget"]["resumed_from"] == ["first"] and "resumed_in_place" not in entry["budget"]
    assert entry["budget"]["wall_time_sec"] == 900.0 + 120.0, entry["budget"]  # the first's parts, then its own
    assert entry["curve"]["step"] == [100, 200, 300, 400]


def test_a_retested_checkpoint_is_collected_as_the_experiment_its_settings_match():
    """ProtoNet's 20-way figure re-tests the 60-way 1-shot model (the paper trains one model per
    shot): --experiment protonet_omniglot_20w1s is accepted for it, another setting is refused."""
    trained = {
        "algorithm": {"name": "protonet"},
        "dataset": {"name": "omniglot"},
        "ways": 60,
        "shots": 1,
        "queries": 5,
        "meta_batch_size": 1,
        "test_ways": 5,
        "test_shots": 1,
        "test_queries": 15,
    }
    tested = {**trained, "test_ways": 20}
    reproduce.check_retested_setting("protonet_omniglot_20w1s", trained, tested)
    with pytest.raises(reproduce.ReproduceError, match="sets test_ways=5, but the run was tested with 20"):
        reproduce.check_retested_setting("protonet_omniglot_5w1s", trained, tested)
    with pytest.raises(reproduce.ReproduceError, match="sets shots=5, but the run was trained with 1"):
        reproduce.check_retested_setting("protonet_omniglot_20w5s", trained, {**tested, "test_shots": 5})
    with pytest.raises(reproduce.ReproduceError, match="sets algorithm.name=matchingnet, but the run was trained"):
        reproduce.check_retested_setting("matchingnet_omniglot_20w1s", trained, tested)


def test_a_retested_checkpoint_is_checked_against_the_experiment_its_file_builds_on():
    """fomaml_omniglot_5w1s states only what differs from maml_omniglot_5w1s (its defaults list),
    which states only its budget on the learner's paper setting (conf/paper_defaults/): the settings
    it inherits (Finn's network, α, shots, protocol) are checked too, not only its own lines."""
    chosen, setting = reproduce.experiment_setting("fomaml_omniglot_5w1s")
    assert chosen == {"algorithm": "fomaml", "dataset": "omniglot"}
    assert setting["algorithm"]["inner_lr"] == 0.4 and setting["backbone"]["stride"] == 2
    trained = {
        "algorithm": {
            "name": "fomaml",
            "inner_lr": 0.4,
            "inner_steps": 1,
            "eval_inner_steps": 10,
            "inner_loss": "sum_over_shots",
            "adapt_norm": False,
            "init": "finn",
        },
        "dataset": {"name": "omniglot", "protocol": "finn", "resample": "binary_nearest"},
        "backbone": {
            "name": "conv4",
            "pooled_blocks": 0,
            "stride": 2,
            "global_average": True,
            "batch_norm_scale": False,
        },
        **{key: setting[key] for key in ("ways", "shots", "queries", "meta_batch_size")},
        **{key: setting.get(key, 5) for key in ("test_ways", "test_shots", "test_queries")},
        "test_checkpoint": "last",
    }
    reproduce.check_retested_setting("fomaml_omniglot_5w1s", trained, trained)
    other = {**trained, "algorithm": {**trained["algorithm"], "inner_lr": 0.1}}
    with pytest.raises(reproduce.ReproduceError, match="sets algorithm.inner_lr=0.4, but the run was trained with 0.1"):
        reproduce.check_retested_setting("fomaml_omniglot_5w1s", other, other)


@pytest.mark.slow  # ~40 s: a real run then a re-evaluation; the generator and collect are tested on fixtures above
def test_run_then_collect_an_old_run_without_per_episode_values(repo_copy):
    # A short real run through reproduce.py (MAML, sinusoid K=5, 20 outer steps): trained, meta-tested,
    # collected into results/ and the README, with the budget override recorded.
    budget = ["trainer.max_steps=20", "trainer.val_check_interval=10", "val_episodes=10", "test_episodes=30"]
    finished = reproduce_cli("maml_sinusoid_5shot", *budget, root=repo_copy)
    assert finished.returncode == 0, finished.stderr[-3000:]
    entry = json.loads((repo_copy / "results" / "maml_sinusoid_5shot.json").read_text())
    assert entry["budget"]["steps"] == 20 and entry["budget"]["episodes"] == 20 * 25
    assert entry["budget_overrides"] == ["trainer.max_steps=20"] and entry["variant"] == []
    assert entry["paper"]["value"] == 0.67 and entry["paper"]["budget"]["steps"] == 70000
    assert entry["per_episode"]["episode"] == list(range(30))
    assert entry["per_episode"]["source"] == "recorded by the run"
    values = entry["per_episode"]["values"]["mse"]
    assert sum(values) / 30 == pytest.approx(entry["metrics"]["test/mse"]["mean"], rel=1e-5)
    assert entry["machine"]["cores"] >= 1 and entry["software"]["torch"] and entry["curve"]["step"]
    # The paper's figure is after one inner step, the run tests after ten: reproduce.py meta-tested
    # the checkpoint again with eval_inner_steps=1 (paper.evaluations) on the same episodes.
    one_step = entry["metrics"]["one_step/test/mse"]
    assert one_step["mean"] != entry["metrics"]["test/mse"]["mean"]
    assert one_step["mean"] == pytest.approx(sum(entry["per_episode"]["values"]["one_step/mse"]) / 30, rel=1e-5)
    assert entry["metric"] == "one_step/test/mse" and entry["curve"]["tag"] == "val/mse"
    assert (
        f"| maml_sinusoid_5shot | — | one_step/test/mse | {one_step['mean']:.2f} ± {one_step['ci95']:.2f} (30) | 0.67 |"
        in (repo_copy / "README.md").read_text()
    )

    # The same run as one made before per-episode values: collect re-evaluates its checkpoint, says so,
    # and gets the very same values.
    run_dir = repo_copy / "logs" / "maml_sinusoid_5shot"
    (run_dir / "test_episodes.json").unlink()
    collected = reproduce_cli("--collect", str(run_dir), "--name", "old_run", root=repo_copy)
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert "predates per-episode values: re-running metalab-eval" in collected.stdout
    old = json.loads((repo_copy / "results" / "old_run.json").read_text())
    assert old["per_episode"]["source"].startswith("metalab-eval re-run of")
    assert old["per_episode"]["values"] == entry["per_episode"]["values"]
    # Two runs on the same episodes, neither ProtoNet: the pair is in the paired table, which the
    # generator writes beside the README (docs/reproduction.md), at each test-time step count.
    paired_row = "| maml_sinusoid_5shot | old_run | mse, after 1 step | 0.00 ± 0.00 | 30 |"
    assert paired_row in (repo_copy / "docs" / "reproduction.md").read_text()
    # A finished run is not trained again.
    again = reproduce_cli("maml_sinusoid_5shot", *budget, root=repo_copy)
    assert again.returncode == 2 and "holds a finished run already" in again.stderr


def test_entry_json_puts_number_lists_on_one_line_and_leaves_strings_alone():
    entry = {"overrides": ["backbone.hidden_sizes=[32,32]"], "values": {"acc": [0.8, 1.0, None]}, "empty": []}
    text = reproduce.entry_json(entry)
    assert json.loads(text) == entry and '"acc": [0.8, 1.0, null]' in text


def test_the_protocol_column_says_when_the_test_classes_were_cut_to_another_protocol_s():
    entry = fixture_entry("relationnet_omniglot_5w1s", "relationnet", [1.0, 0.8])
    assert reproduce.protocol_of(entry) == "vinyals"
    entry["per_episode"]["episodes"]["dataset"].update(protocol="sung", test_unseen_by="vinyals")
    assert reproduce.protocol_of(entry) == "sung, test unseen by vinyals"
