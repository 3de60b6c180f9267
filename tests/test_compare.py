"""dsf-compare: runs read back from results.json files and Lightning CSV logs, grouped, tabled, plotted."""

from __future__ import annotations

import json

import pytest
import torch

from dsf_lightning.runs.compare import main, markdown_table
from dsf_lightning.runs.records import find_runs


def _results(path, model, method, density, seed, metrics=None, perplexity=None, allocation="uniform"):
    path.mkdir(parents=True, exist_ok=True)
    identity = dict(model=model, method=method, density=density, seed=seed, allocation=allocation)
    body = {"identity": identity, "config": {}}
    if metrics is not None:
        body["metrics"] = metrics
    if perplexity is not None:
        body["perplexity"] = perplexity
    (path / "results.json").write_text(json.dumps(body))


def test_groups_means_and_missing_stages(tmp_path, capsys):
    for seed, acc in ((0, 0.80), (1, 0.90)):
        _results(tmp_path / f"dsf{seed}", "r20", "dsf", 0.1, seed,
                 {"dense/val_acc": 0.95, "pre_finetune/val_acc": acc, "post_finetune/val_acc": acc + 0.05})
    _results(tmp_path / "mag", "r20", "magnitude", 0.1, 0, {"dense/val_acc": 0.95, "pre_finetune/val_acc": 0.3})
    _results(tmp_path / "llm", "smollm2", "dsf", 0.5, 0,
             perplexity={"dense": {"wiki": 20.0}, "pre_finetune": {"wiki": 26.0}, "post_finetune": {"wiki": 24.0}})
    records = find_runs([tmp_path])
    assert len(records) == 4
    table = markdown_table(records, "val_acc")
    assert "| r20 | dsf | 0.1 | uniform | 95.00 +- 0.00 (2) | 85.00 +- 7.07 (2) | 90.00 +- 7.07 (2) |" in table
    # the magnitude run never reached fine-tuning: shown as missing, not dropped
    assert "| r20 | magnitude | 0.1 | uniform | 95.00 +- 0.00 (1) | 30.00 +- 0.00 (1) | - |" in table
    assert main([str(tmp_path), "--plot-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "ppl/wiki" in out and "| smollm2 | dsf | 0.5 | uniform | 20.00" in out
    assert (tmp_path / "plots" / "r20-val_acc.png").stat().st_size > 0
    assert (tmp_path / "plots" / "smollm2-ppl_wiki.png").stat().st_size > 0


def test_zero_shot_scores_are_a_column_per_task_and_their_mean(tmp_path, capsys):
    from dsf_lightning.runs.compare import default_metrics, verdict

    for method, acc, ppl in (("dsf", (0.5, 0.3), 40.0), ("magnitude", (0.25, 0.1), 90.0)):
        _results(tmp_path / method, "smollm2", method, 0.5, 0, perplexity={"post_finetune": {"wiki": 20.0}})
        body = json.loads((tmp_path / method / "results.json").read_text())
        body["zero_shot"] = {"post_finetune": {
            "wiki_next_sentence": {"acc": acc[0], "acc_stderr": 0.1, "acc_norm": acc[0], "samples": 4},
            "wiki_cloze": {"acc": acc[1], "acc_stderr": 0.1, "perplexity": ppl, "samples": 4}}}
        (tmp_path / method / "results.json").write_text(json.dumps(body))
    records = find_runs([tmp_path])
    assert default_metrics(records) == ["ppl/wiki", "zs/wiki_cloze/acc", "zs/wiki_next_sentence/acc", "zs/mean/acc"]
    assert "| smollm2 | dsf | 0.5 | uniform | 40.00 +- 0.00 (1) |" in markdown_table(records, "zs/mean/acc")
    assert "dsf leads magnitude at 0.5 (+22.50" in verdict(records, "zs/mean/acc")
    assert "dsf leads magnitude at 0.5 (-50.00" in verdict(records, "zs/wiki_cloze/perplexity")  # lower is better
    assert main([str(tmp_path)]) == 0 and "zs/mean/acc" in capsys.readouterr().out


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing here")
    assert main([str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "other" / "results.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="no 'identity' header"):
        find_runs([bad])


def test_callback_runs_in_csv_logs(tmp_path, capsys):
    pl = pytest.importorskip("lightning.pytorch")
    import torch.nn.functional as F
    from lightning.pytorch.loggers import CSVLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dsf_lightning import DSFPruneCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)),
                      batch_size=16)
    for method in ("dsf", "magnitude"):
        for density in (0.3, 0.5):
            cb = DSFPruneCallback(density, method, family="vision", log_dense=True, progress=False,
                                  factorization_options={"outer_iters": 2} if method == "dsf" else None)
            pl.Trainer(accelerator="cpu", max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[cb],
                       enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False).fit(Net(), data, data)
    records = find_runs([tmp_path])
    # the DSF runs carry their option: a variant, labelled as such
    assert sorted((r.method, r.density) for r in records) == [("dsf+outer_iters=2", 0.3), ("dsf+outer_iters=2", 0.5),
                                                              ("magnitude", 0.3), ("magnitude", 0.5)]
    assert all(r.model == "Net" and set(r.metrics) == {"dense", "pre_finetune", "post_finetune"} for r in records)
    assert main([str(tmp_path), "--plot-dir", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "Net-val_acc.png").exists()


def test_run_identity_names_and_variants(tmp_path):
    from dsf_lightning.runs.records import method_label, run_identity, run_name

    who = run_identity("resnet20-32", "dsf", 0.1, 0)
    assert run_name(who) == "resnet20-32-dsf-d0.1-s0"
    assert run_name(run_identity("m", "wanda", 0.5, 1, "global")) == "m-wanda-d0.5-s1-global"
    assert method_label("dsf", {"finalize": ["second"]}) == "dsf+finalize=second"
    assert method_label("dsf", {"finalize": []}) == "dsf+finalize="
    # variants of one method are separate groups, never averaged together
    _results(tmp_path / "a", "m", "dsf", 0.5, 0, {"pre_finetune/val_acc": 0.5})
    body = json.loads((tmp_path / "a" / "results.json").read_text())
    body["identity"]["options"] = {"fixed_mask": True}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(body))
    assert sorted(r.method for r in find_runs([tmp_path])) == ["dsf", "dsf+fixed_mask=True"]


def test_dashboard_report_is_built_from_the_logging_conventions():
    pytest.importorskip("wandb_workspaces")  # a dev dependency; the check needs no network
    from dsf_lightning.runs.dashboard import STAGES_SHOWN, build_report

    report = build_report("me", "dsf-llm", "ppl/wikipedia", group="smollm2-135m-wikipedia", log_y=True)
    grid = next(b for b in report.blocks if hasattr(b, "panels"))
    assert [p.y.name for p in grid.panels] == [f"{s}/ppl/wikipedia" for s in STAGES_SHOWN]
    assert all(p.x.name == "identity.density" and p.log_y for p in grid.panels)
    (runset,) = grid.runsets
    assert runset.project == "dsf-llm" and "identity.method" in runset.groupby
    assert "smollm2-135m-wikipedia" in runset.filters


def test_dense_wandb_runs_and_tuple_hparams_are_read_without_error(tmp_path):
    """A dense-training W&B run (no run identity) is not a pruned run: skipped; a Lightning hparams.yaml with
    a tuple (``!!python/tuple``, as ImageClassifier's milestones) is read."""
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="dsf-test", config={"lr": 0.1})
    run.log({"val_acc": 0.5})
    run.finish()
    _results(tmp_path / "pruned", "r20", "dsf", 0.1, 0, {"pre_finetune/val_acc": 0.9})
    log = tmp_path / "csv" / "version_0"
    log.mkdir(parents=True)
    (log / "hparams.yaml").write_text("milestones: !!python/tuple\n- 15\n- 22\n"
                                      "dsf:\n  model: Net\n  method: magnitude\n  density: 0.2\n  seed: 0\n")
    (log / "metrics.csv").write_text("pre_finetune/val_acc,step\n0.7,0\n")
    records = sorted(find_runs([tmp_path]), key=lambda r: r.model)
    assert [(r.model, r.method) for r in records] == [("Net", "magnitude"), ("r20", "dsf")]
    assert records[0].metrics["pre_finetune"]["val_acc"] == 0.7  # float("0.7")


def _sweep(densities, seeds=(0, 1)):
    from dsf_lightning.runs.records import RunRecord

    return [RunRecord("r20", method, d, seed, metrics={
        "dense": {"val_acc": 0.99}, "pre_finetune": {"val_acc": base * d + 0.01 * seed},
        "post_finetune": {"val_acc": 0.9 + base * d / 10 + 0.01 * seed}})
        for method, base in (("dsf", 2.0), ("magnitude", 1.0)) for d in densities for seed in seeds]


def test_one_density_is_drawn_as_grouped_bars_per_stage():
    from dsf_lightning.runs.compare import figure

    fig = figure(_sweep([0.1]), "val_acc", "r20")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["before FT", "after FT"]  # categories, not densities
    assert ax.get_xscale() == "linear" and len(ax.patches) == 2 * 2  # a bar per method and stage
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted(round(v, 6) for v in (20.5, 10.5, 92.5, 91.5))  # means over the 2 seeds, in %
    assert any(line.get_linestyle() == "--" for line in ax.get_lines())  # the dense reference
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"dsf", "magnitude", "dense"}


def test_a_sweep_has_a_log_density_axis_and_error_bars():
    from dsf_lightning.runs.compare import figure

    fig = figure(_sweep([0.05, 0.1, 0.25]), "val_acc", "r20")
    assert len(fig.axes) == 2  # before and after fine-tuning
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.05", "0.1", "0.25"]
        assert len(ax.containers) == 2  # an errorbar container per method: the seeds' spread


def test_verdict_is_computed_from_the_seed_means_and_spread():
    from dsf_lightning.runs.compare import verdict
    from dsf_lightning.runs.records import RunRecord

    def runs(method, density, accs):
        return [RunRecord("r20", method, density, s, metrics={"post_finetune": {"val_acc": a}})
                for s, a in enumerate(accs)]

    records = (runs("dsf", 0.05, [0.95, 0.96]) + runs("magnitude", 0.05, [0.90, 0.91])  # +5 points: leads
               + runs("dsf", 0.1, [0.97, 0.99]) + runs("magnitude", 0.1, [0.975, 0.98])  # +0.25 < std 1.41: tie
               + runs("dsf", 0.3, [0.980, 0.980]) + runs("magnitude", 0.3, [0.990, 0.990]))  # -1 point: trails
    text = verdict(records, "val_acc", "dsf", "magnitude", resolution=0.28)
    assert text.startswith("After fine-tuning, dsf leads magnitude at 0.05 (+5.00, seed std 0.71); "
                           "ties it at 0.1 (+0.25, seed std 1.41); trails it at 0.3 (-1.00, seed std 0.00)")
    # one validation sample is the finest difference that counts
    coarse = verdict(records, "val_acc", "dsf", "magnitude", resolution=1.5)
    assert "ties it at 0.1 (+0.25, seed std 1.41), 0.3 (-1.00, seed std 0.00)" in coarse and "trails" not in coarse
    assert verdict(records[:2], "val_acc", "dsf", "magnitude").startswith("No density has fine-tuned runs")
    # one image of 360 apart, accuracies as a run stores them: a tie at the resolution of one image
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731  (as Lightning logs them)
    one_image = (runs("dsf", 0.05, [f32(359 / 360), f32(358 / 360)])
                 + runs("magnitude", 0.05, [f32(357 / 360), f32(358 / 360)]))
    assert "ties magnitude at 0.05" in verdict(one_image, "val_acc", "dsf", "magnitude", resolution=100 / 360)
