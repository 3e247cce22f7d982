"""A finished run's folder is recognised by its results, not by where it lies or how many processes ran it:
a moved or copied sweep folder resumes (finished runs skipped), a ddp re-run of a fit-once method's
1-process run is the same results, and a folder of another config is refused naming what differs."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import anomaly
from anomaly.reports.records import RunRecord
from anomaly.run_dir import RunDirTaken, finished_run, refuse_other_results


def config_text(output_dir: Path, *overrides: str) -> str:
    return OmegaConf.to_yaml(anomaly.compose(list(overrides), output_dir=output_dir), resolve=True)


def finished(run_dir: Path, text: str, method: str = "padim") -> RunRecord:
    """``run_dir`` as a successful run of ``text`` left it (its config.yaml and run.json)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(text)
    record = RunRecord(method, "resnet18", "synthetic", "fabric", 0, "ok")
    record.write(run_dir)
    return record


def test_a_moved_sweep_folder_is_the_same_results(tmp_path):
    old, new = tmp_path / "disk1" / "sweep" / "0_padim", tmp_path / "disk2" / "sweep" / "0_padim"
    record = finished(old, config_text(old, "method=padim"))
    (new.parent).mkdir(parents=True)
    old.rename(new)  # the sweep moved to another disk
    assert finished_run(new, config_text(new, "method=padim")) == record


@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_a_ddp_rerun_of_a_fit_once_run_is_the_same_results(tmp_path, method):
    run_dir = tmp_path / "run"
    record = finished(run_dir, config_text(run_dir, f"method={method}"), method)
    ddp = config_text(run_dir, f"method={method}", "trainer=ddp", "trainer.devices=2")
    assert finished_run(run_dir, ddp) == record


def test_a_ddp_rerun_of_a_trained_method_says_it_differs_only_in_the_processes(tmp_path):
    run_dir = tmp_path / "run"
    finished(run_dir, config_text(run_dir, "method=simplenet"), "simplenet")
    ddp = config_text(run_dir, "method=simplenet", "trainer=ddp", "trainer.devices=2")
    assert finished_run(run_dir, ddp) is None  # data-parallel training: other results
    with pytest.raises(RunDirTaken, match=r"differs only in how many processes run it \(trainer\.devices"):
        refuse_other_results(run_dir, ddp)


def test_another_config_is_refused_naming_what_differs(tmp_path):
    run_dir = tmp_path / "run"
    finished(run_dir, config_text(run_dir, "method=padim"))
    other = config_text(run_dir, "method=padim", "seed=3", "method.model.n_features=50")
    assert finished_run(run_dir, other) is None
    differing = r"differs in dataset\.seed, method\.model\.n_features, method\.model\.seed, seed\)"
    with pytest.raises(RunDirTaken, match=f"{differing}.*force=true"):
        refuse_other_results(run_dir, other)
