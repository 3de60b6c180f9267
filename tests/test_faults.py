"""Faults survived with nothing lost: a DDP rank dying in the prune, corrupt files, interrupted exports, a full disk,
a NaN loss, Ctrl-C in the prune, and every run proving its masks.

The DDP runs execute this file as a script (Lightning's launcher starts it again for rank 1):
``python tests/test_faults.py callback OUT FAULT RANK`` or ``python tests/test_faults.py llm FAULT RANK <recipe
args>``; ``FAULT`` (``raise`` or ``kill``) strikes rank ``RANK`` when the prune's executor starts, while the other rank
goes on into the prune's collectives. Every rank writes its pid to ``OUT/pid<rank>`` so the test can see that no
process outlives the run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEADLINE_S = 120  # the issue's bound for the surviving rank on CPU (the collective timeout is 30 minutes)


def _faulty(make_executor, fault: str, victim: int):
    """``make_executor`` whose executor, on rank ``victim``, raises or SIGKILLs its own process."""
    def make(progress: bool = True):
        run = make_executor(progress)

        def executor(jobs):
            if int(os.environ.get("LOCAL_RANK", 0)) == victim:
                time.sleep(0.5)  # the other rank is in its solve or its first collective by now
                if fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault on rank {victim}")
            return run(jobs)
        return executor
    return make


def _script_callback(out: str, fault: str, victim: int) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_callback import ResNetModule

    import dsf_lightning.pipeline.entry as entry
    from dsf_lightning.callbacks import DSFPruneCallback
    from dsf_lightning.recipes.common import load_weights_file

    entry.distributed_executor = _faulty(entry.distributed_executor, fault, victim)
    module = ResNetModule()
    load_weights_file(module.model, os.path.join(out, "dense.pt"))
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    cb = DSFPruneCallback(0.3, include=[r"model\.layer1\.\d\.conv\d"], factorization_options={"outer_iters": 2},
                          progress=False, evaluate=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb, ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True)])
    trainer.fit(module, loader)


def _script_llm(fault: str, victim: int, args: list[str]) -> int:
    import dsf_lightning.pipeline.entry as entry
    from dsf_lightning.recipes import llama_main

    entry.distributed_executor = _faulty(entry.distributed_executor, fault, victim)
    return llama_main(args)


if __name__ == "__main__":
    sys.path[:0] = [ROOT, HERE]
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = sys.argv[1]
    out_dir = sys.argv[2] if kind == "callback" else sys.argv[sys.argv.index("--output-dir") + 1]
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, f"pid{rank}").write_text(str(os.getpid()))
    if kind == "callback":
        _script_callback(out_dir, sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    sys.exit(_script_llm(sys.argv[2], int(sys.argv[3]), sys.argv[4:]))

from test_callback import LlamaModule, ResNetModule, tokens, trainer  # noqa: E402  (tests/ is on sys.path)
from wandb_offline import wandb_records  # noqa: E402

from dsf_lightning.callbacks import DSFPruneCallback, FiniteLossGuard, NonFiniteLossError  # noqa: E402
from dsf_lightning.callbacks.checkpoint import load_pruned_checkpoint  # noqa: E402
from dsf_lightning.models import load_packed_causal_lm  # noqa: E402
from dsf_lightning.modules import is_pruned_module  # noqa: E402
from dsf_lightning.persistence.export import load_packed, save_packed  # noqa: E402
from dsf_lightning.persistence.files import atomic_folder  # noqa: E402
from dsf_lightning.persistence.structure import load_pruned, nonzeros_outside_masks, save_pruned  # noqa: E402
from dsf_lightning.pipeline.entry import prune  # noqa: E402
from dsf_lightning.recipes import llama_main  # noqa: E402
from dsf_lightning.recipes.llm.run import export_pruned  # noqa: E402


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative names)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2):
    """A random 2-block LLaMA with SmolLM2's tokenizer, as ``save_pretrained`` writes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _recipe_args(model_dir, out, *extra: str) -> list[str]:
    fast = [] if "--method" in extra else ["--factorization-options", '{"outer_iters": 2}']  # DSF's options
    return ["--model", str(model_dir), "--seq-len", "64", "--calibration-samples", "8", "--eval-samples", "4", *fast,
            "--accelerator", "cpu", "--output-dir", str(out), "--no-progress-bar", *extra]


# ------------------------------------------------------------------------------------------------
# 1. a DDP rank raises or is killed during the prune
# ------------------------------------------------------------------------------------------------
def _run_ranks(cmd: list[str], out: Path, cwd: Path) -> tuple[int, str, float]:
    """Run a 2-process job; returns its exit status, output and seconds until no rank is left."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    start = time.monotonic()
    # the output pipe stays open until every rank has exited: the timeout bounds the survivor too
    proc = subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=DEADLINE_S + 60)
    seconds = time.monotonic() - start
    for rank in (0, 1):
        pid = int((out / f"pid{rank}").read_text())
        with pytest.raises(ProcessLookupError):  # no rank outlives the run
            for _ in range(20):
                os.kill(pid, 0)
                time.sleep(0.5)
    return proc.returncode, proc.stdout + proc.stderr, seconds


@pytest.mark.parametrize("fault,victim", [("raise", 1), ("kill", 0)])
def test_ddp_rank_fault_in_the_callback_prune(tmp_path, fault, victim):
    out = tmp_path / "out"
    (out / "ckpt").mkdir(parents=True)
    torch.save(ResNetModule().model.state_dict(), out / "dense.pt")
    (out / "ckpt" / "earlier.ckpt").write_bytes(os.urandom(4096))  # an earlier run's checkpoint
    before = _digest(out)
    code, log, seconds = _run_ranks([sys.executable, __file__, "callback", str(out), fault, str(victim)], out, tmp_path)
    assert code != 0 and seconds < DEADLINE_S, (code, seconds, log[-3000:])
    if fault == "raise":  # the victim names it; the survivor may be killed by Lightning's process observer first
        assert f"injected fault on rank {victim}" in log, log[-3000:]
    else:  # a killed rank says nothing: the survivor names the collective that lost it
        assert f"rank {1 - victim} of 2: the broadcast" in log and "another rank stopped" in log, log[-3000:]
    after = _digest(out)
    assert {k: after[k] for k in before if not k.startswith("pid")} == {k: v for k, v in before.items()
                                                                          if not k.startswith("pid")}
    assert not (out / "ckpt" / "last.ckpt").exists()  # nothing half-done was saved as a checkpoint


@pytest.mark.parametrize("fault,victim", [("kill", 1), ("raise", 0)])
def test_ddp_rank_fault_in_the_llm_recipe_prune(tiny_llama, wiki_texts, tmp_path, fault, victim):
    calib = tmp_path / "calib.txt"
    calib.write_text(wiki_texts[0][:20000])
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": "run"}')  # an earlier run's results in the output folder
    before, dense = _digest(out), _digest(tiny_llama)
    args = _recipe_args(tiny_llama, out, "--devices", "2", "--calibration-text", str(calib), "--eval-text",
                        str(calib), "--finetune-steps", "1", "--wandb", "off")
    code, log, seconds = _run_ranks([sys.executable, __file__, "llm", fault, str(victim), *args], out, tmp_path)
    assert code != 0 and seconds < DEADLINE_S, (code, seconds, log[-3000:])
    if fault == "raise":
        assert f"injected fault on rank {victim}" in log, log[-3000:]
    else:
        assert f"rank {1 - victim} of 2:" in log and "another rank stopped" in log, log[-3000:]
    assert _digest(tiny_llama) == dense  # the dense model on disk
    after = _digest(out)
    assert after["results.json"] == before["results.json"] and not (out / "packed").exists()


# ------------------------------------------------------------------------------------------------
# 2. truncated or corrupted files
# ------------------------------------------------------------------------------------------------
def _small_pruned(storage="compressed"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    prune(model, 0.4, "dsf", progress=False, factorization_options={"outer_iters": 2}, storage=storage)
    return model


def _dense_like():
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))


def _cuts(data: bytes) -> list[tuple[str, bytes]]:
    n = len(data)
    return [(f"cut at {o}", data[:o]) for o in (0, 7, n // 3, n // 2, n - 1)]


def _flipped(data: bytes, offset: int) -> tuple[str, bytes]:
    return f"byte {offset} flipped", data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:]


def _refuses(load, path: Path, damaged: list[tuple[str, bytes]], reference=None) -> None:
    """Each damaged file is a ``ValueError`` naming it, and the receiving model is left as it was; with
    ``reference`` (a state dict) a damage may also be harmless, but then the model loads bit-identical."""
    for what, blob in damaged:
        path.write_bytes(blob)
        model = _dense_like()
        before = _state(model)
        try:
            load(model, path)
        except ValueError as e:
            assert path.name in str(e) and any(w in str(e) for w in ("truncated", "corrupted", "could not be read")), \
                (what, e)
            assert _same_state(model, before) and not any(map(is_pruned_module, model.modules())), what
            continue
        assert reference is not None and _same_state(model, reference), f"{what}: loaded a different model"


def _data_offsets(path: Path) -> list[int]:
    """Offsets into the tensor bytes of a ``torch.save`` file's largest record."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + name_len + extra_len
    return [start, start + info.compress_size // 2, start + info.compress_size - 1]


def test_truncated_or_corrupted_save_pruned_file_is_refused(tmp_path):
    path = tmp_path / "pruned.pt"
    model = _small_pruned()
    save_pruned(model, path)
    data, reference = path.read_bytes(), _state(model)
    _refuses(load_pruned, tmp_path / "bad.pt", _cuts(data) + [_flipped(data, o) for o in _data_offsets(path)])
    n = len(data)  # anywhere else: refused, or harmless (e.g. zip padding) and then the same model
    _refuses(load_pruned, tmp_path / "bad.pt", [_flipped(data, o) for o in range(0, n, max(1, n // 40))], reference)


def test_truncated_or_corrupted_packed_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_packed(_small_pruned(), path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    # safetensors checks the header's layout, the digest everything else: no flip anywhere is harmless
    flips = [_flipped(data, o) for o in range(0, len(data), max(1, len(data) // 60))]
    _refuses(load_packed, tmp_path / "bad.safetensors", _cuts(data) + flips + [_flipped(data, header)])


def test_truncated_or_corrupted_lightning_checkpoint_is_refused(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = LlamaModule()
    tr = trainer(tmp_path, [DSFPruneCallback(0.4, factorization_options={"outer_iters": 2}, progress=False,
                                             evaluate=False), ModelCheckpoint(dirpath=tmp_path / "ckpt")],
                 enable_checkpointing=True, max_steps=1)
    tr.fit(module, tokens(), tokens())
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    data = ckpt.read_bytes()
    bad = tmp_path / "bad.ckpt"
    for what, blob in _cuts(data) + [_flipped(data, o) for o in _data_offsets(ckpt)]:
        bad.write_bytes(blob)
        target = LlamaModule()
        before = _state(target)
        with pytest.raises(ValueError, match="bad.ckpt"):
            load_pruned_checkpoint(target, bad)
        assert _same_state(target, before), what
    assert is_pruned_module(load_pruned_checkpoint(LlamaModule(), ckpt).model.model.layers[0].mlp.up_proj)


class _Payload:
    """A pickle that would run code on load: ``weights_only`` loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_file_that_would_execute_code_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "executed", tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "dsf_structure": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="evil.pt.*could not be read"):
        load_pruned(_dense_like(), path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# 3. an export interrupted midway, a full disk
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def exported(tiny_llama, tmp_path):
    """A pruned tiny LLaMA, its tokenizer, a folder holding a complete earlier export of it (``packed/``,
    ``merged/``) and token ids to run it on."""
    import copy

    from dsf_lightning.models import load_causal_lm

    model, tok, _ = load_causal_lm(str(tiny_llama))
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :64]
    prune(model, 0.5, "magnitude", progress=False)
    out = tmp_path / "export"
    export_pruned(copy.deepcopy(model), tok, str(out))  # export merges the model it is given
    return model, tok, out, ids


def _export_intact(out: Path, before: dict[str, str], ids: torch.Tensor, model) -> None:
    assert _digest(out) == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left beside them
    packed, _ = load_packed_causal_lm(out / "packed")
    with torch.no_grad():
        got, ref = packed(input_ids=ids).logits, model(input_ids=ids).logits
    # fp16 storage rounds each stored weight once (eps 2^-10); 15 rounded matrices on the path (2 blocks + head)
    assert (got - ref).norm() <= 2 ** -10 * 15 * ref.norm()


def test_export_interrupted_by_an_exception_keeps_the_previous_export(exported, monkeypatch):
    model, tok, out, ids = exported
    before = _digest(out)

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted between files")

    monkeypatch.setattr(type(tok), "save_pretrained", broken)  # after the packed file and the config
    with pytest.raises(RuntimeError, match="between files"):
        export_pruned(model, tok, str(out))
    _export_intact(out, before, ids, model)


def test_export_killed_between_files_keeps_the_previous_export(exported, tiny_llama, tmp_path):
    model, tok, out, ids = exported
    before = _digest(out)
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path[:0] = [{ROOT!r}]\n"
        "from dsf_lightning.models import load_causal_lm\n"
        "from dsf_lightning.pipeline.entry import prune\n"
        "from dsf_lightning.recipes.llm.run import export_pruned\n"
        f"model, tok, _ = load_causal_lm({str(tiny_llama)!r})\n"
        "prune(model, 0.3, 'magnitude', progress=False)\n"
        "type(tok).save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # after the packed file\n"
        f"export_pruned(model, tok, {str(out)!r})\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (dead,) = [p for p in out.iterdir() if p.name.startswith(".")]  # the new folder it was writing
    assert dead.name.startswith(".packed.tmp") and (dead / "dsf-packed.safetensors").is_file()
    shutil.rmtree(dead)  # left by the killed process (the next export of that process id would replace it)
    _export_intact(out, before, ids, model)


def test_full_disk_keeps_the_previous_files(exported, monkeypatch, tmp_path):
    model, tok, out, ids = exported
    before = _digest(out)
    import dsf_lightning.persistence.export as export

    real = export.save_file

    def full_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the disk filled up halfway through the file
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(export, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_pruned(model, tok, str(out))
    _export_intact(out, before, ids, model)
    # save_pruned too: the earlier file stays whole and loadable
    small, path = _small_pruned(), tmp_path / "pruned.pt"
    save_pruned(small, path)
    data = path.read_bytes()

    def torch_full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", torch_full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_pruned(_small_pruned(), path)
    assert path.read_bytes() == data and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    x = torch.randn(3, 32)
    assert torch.equal(load_pruned(_dense_like(), path)(x), small(x))


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_folder(target) as tmp:
        (tmp / "a").write_text("2")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (target / "a").read_text() == "1"
    with atomic_folder(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # the new export whole, nothing of the old one


# ------------------------------------------------------------------------------------------------
# 4. NaN or Inf loss in fine-tuning
# ------------------------------------------------------------------------------------------------
class _Diverging(LlamaModule):
    """The loss turns NaN at global step 3 (after three good optimizer steps)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 3 else loss


def test_nan_loss_stops_the_run_naming_the_step_and_keeping_the_last_good_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _Diverging()
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    tr = trainer(tmp_path, [DSFPruneCallback(0.4, factorization_options={"outer_iters": 2}, progress=False,
                                             evaluate=False), FiniteLossGuard(), ckpts],
                 enable_checkpointing=True, max_epochs=2, limit_train_batches=4)
    with pytest.raises(NonFiniteLossError, match=r"global step 3 .*Last good checkpoint: (.*\.ckpt) \(kept\)") as err:
        tr.fit(module, tokens(), tokens())
    path = err.value.args[0].split("Last good checkpoint: ")[1].removesuffix(" (kept)")
    last = torch.load(path, weights_only=True)
    assert last["global_step"] == 3 and os.path.dirname(path) == str(tmp_path / "ckpt")
    state = module.state_dict()  # stopped before the backward: the weights are the checkpoint's
    assert all(torch.equal(v, state[k]) for k, v in last["state_dict"].items())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_every_recipe_trainer_guards_the_loss(tiny_llama, wiki_texts, tmp_path, monkeypatch):
    from dsf_lightning.models import CausalLM

    real = CausalLM.training_step
    monkeypatch.setattr(CausalLM, "training_step", lambda self, b, i: real(self, b, i) * float("inf"))
    calib = tmp_path / "calib.txt"
    calib.write_text(wiki_texts[0][:20000])
    with pytest.raises(NonFiniteLossError, match="global step 0"):
        llama_main(_recipe_args(tiny_llama, tmp_path / "out", "--method", "magnitude", "--calibration-text",
                                str(calib), "--eval-text", str(calib), "--finetune-steps", "2", "--wandb", "off"))
    from dsf_lightning.recipes import resnet20_parser
    from dsf_lightning.recipes.common import make_trainer

    config = resnet20_parser().parse(["--no-progress-bar"])
    tr = make_trainer(config, max_epochs=1, callbacks=[], logger=None, checkpoint_dir=None)
    assert any(isinstance(cb, FiniteLossGuard) for cb in tr.callbacks)


# ------------------------------------------------------------------------------------------------
# 5. Ctrl-C during the prune: fully pruned or unchanged
# ------------------------------------------------------------------------------------------------
def _interrupt_on_call(monkeypatch, owner, name: str, call: int) -> None:
    """``owner.name`` sends this process SIGINT (Ctrl-C) on its ``call``-th call."""
    real, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises KeyboardInterrupt here
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def test_ctrl_c_in_a_sequential_prune_leaves_the_model_unchanged(monkeypatch):
    import dsf_lightning.pipeline.entry as entry

    model = LlamaModule().model
    before = _state(model)
    _interrupt_on_call(monkeypatch, entry, "solve_serially", call=2)  # block 0 is in place by then
    batches = [b[0] for b in tokens()]
    with pytest.raises(KeyboardInterrupt) as err:
        prune(model, 0.4, "dsf", calibration=batches, sequential=True, progress=False,
              factorization_options={"outer_iters": 2})
    assert "the model is unchanged (7 layer(s) put back" in "\n".join(err.value.__notes__)
    assert _same_state(model, before) and not any(map(is_pruned_module, model.modules()))


def test_ctrl_c_while_installing_leaves_the_model_unchanged(monkeypatch):
    import dsf_lightning.pipeline.install as install

    model = LlamaModule().model
    before = _state(model)
    _interrupt_on_call(monkeypatch, install, "pruned_module", call=5)
    with pytest.raises(KeyboardInterrupt) as err:
        prune(model, 0.4, "magnitude", progress=False)
    assert "the model is unchanged (5 layer(s) put back" in "\n".join(err.value.__notes__)  # 4 done, the 5th begun
    assert _same_state(model, before) and not any(map(is_pruned_module, model.modules()))


def test_ctrl_c_in_the_callback_prune_leaves_the_module_dense(monkeypatch, capsys, tmp_path):
    import dsf_lightning.pipeline.entry as entry

    module = LlamaModule()
    before = _state(module)
    _interrupt_on_call(monkeypatch, entry, "solve_serially", call=2)
    cb = DSFPruneCallback(0.4, calibration_batches=2, sequential=True, factorization_options={"outer_iters": 2},
                          progress=False)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C
            trainer(tmp_path, [cb]).fit(module, tokens(), tokens())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from then on
    assert "the prune stopped with KeyboardInterrupt; the model is unchanged" in capsys.readouterr().err
    assert _same_state(module, before) and not any(map(is_pruned_module, module.modules()))


# ------------------------------------------------------------------------------------------------
# 6. every run proves its masks; WANDB_MODE=disabled means no run
# ------------------------------------------------------------------------------------------------
def test_nonzeros_outside_masks_is_a_real_count():
    assert nonzeros_outside_masks(_small_pruned()) == 0  # compressed: such entries cannot even be held
    model = _small_pruned("masked")
    assert nonzeros_outside_masks(model) == 0
    layer = model[0]
    p, m = layer.masked_parameters()[0]
    off = (~m).nonzero()[:3]
    with torch.no_grad():
        p[tuple(off.T)] = 1.0
    assert nonzeros_outside_masks(model) == 3


def test_runs_record_their_mask_proof(tiny_llama, wiki_texts, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(wiki_texts[0][:20000])
    out = tmp_path / "out"
    assert llama_main(_recipe_args(tiny_llama, out, "--calibration-text", str(calib), "--eval-text", str(calib),
                                   "--finetune-steps", "2", "--batch-size", "4", "--no-save-merged",
                                   "--wandb", "offline", "--wandb-dir", str(tmp_path))) == 0
    result = json.load(open(out / "results.json"))
    assert result["nonzeros_outside_masks"] == 0 and result["finetune_steps"] == 2
    summary = wandb_records(tmp_path)["summary"]
    assert summary["nonzeros_outside_masks"] == 0
    # and its memory: the LLM default storage, the training state read from the tensors, the peak
    memory = result["finetune_memory"]
    assert summary["finetune_memory"] == memory and memory["storage"] == "compressed"
    assert memory["training_state_bytes"]["optimizer"] > memory["training_state_bytes"]["parameters"] > 0
    assert memory["peak_bytes"] > memory["training_state_bytes"]["total"]
    # the callback's metrics, in a user's own Trainer
    cb = DSFPruneCallback(0.4, factorization_options={"outer_iters": 2}, progress=False)
    trainer(tmp_path, [cb]).fit(LlamaModule(), tokens(), tokens())
    assert cb.metrics["dsf/nonzeros_outside_masks"] == 0


def test_wandb_mode_disabled_writes_no_run(tiny_llama, wiki_texts, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(wiki_texts[0][:20000])
    assert llama_main(_recipe_args(tiny_llama, tmp_path / "out", "--method", "magnitude", "--calibration-text",
                                   str(calib), "--eval-text", str(calib), "--no-save-packed", "--no-save-merged",
                                   "--wandb-dir", str(tmp_path / "wb"))) == 0  # --wandb auto, the default
    assert not list(tmp_path.rglob("*.wandb")) and not (tmp_path / "wb").exists()
