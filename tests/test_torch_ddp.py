"""DistributedDataParallel over gloo trains gpuconv's layers like one process does.

``scripts/ddp_train.py`` starts two processes on this machine (127.0.0.1, one PyTorch and one
Numba thread each); after one step on its half of the batch each, the parameters must equal
one single-process step on the whole batch (DDP averages the two halves' gradients, which is
the whole batch's mean-loss gradient).
"""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("this PyTorch build has no torch.distributed", allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ddp_train.py"
_spec = importlib.util.spec_from_file_location("ddp_train", SCRIPT)
ddp_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_train)

TIME_LIMIT_S = 150


def _run_script(args):
    """Run the script in its own process group; kill the whole group past the time limit."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               GPUCONV_DEVICE="cpu")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the DDP run took over {TIME_LIMIT_S} s:\n{out}")
    assert proc.returncode == 0, out
    return out


def test_two_gloo_processes_step_like_one_process_on_the_whole_batch(tmp_path):
    saved = tmp_path / "ddp.pt"
    batch, lr = 8, 0.5
    out = _run_script(["--nproc", "2", "--backend", "gloo", "--steps", "1", "--batch",
                       str(batch), "--lr", str(lr), "--dtype", "float64", "--timeout", "60",
                       "--save", str(saved)])
    assert "step 0: loss" in out

    model = ddp_train.build_model(torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    ddp_train.train_step(model, optimizer, *ddp_train.global_batch(0, batch, torch.float64))
    expected = model.state_dict()
    got = torch.load(saved)

    assert got.keys() == expected.keys()
    assert got["2.weight"].shape == (8, 8, 8, 8, 3, 3)  # the unshared layer's kernels
    assert got["2.bias"].shape == (8, 8, 8)  # and its bias per position
    for name, value in expected.items():
        assert not torch.equal(value, before[name]), f"{name} did not change"
        torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-12, msg=name)


def test_spawned_processes_use_gloo_on_a_machine_with_one_gpu(monkeypatch):
    """The README's ``--nproc 2`` run (gloo, 2 CPU processes) on a one-GPU machine: the
    spawned ranks take gloo on the CPU, not nccl on GPUs 0 and 1 (invalid device ordinal);
    nccl with more processes than GPUs stops with a clear message."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seen = {}

    def set_device(device):
        if torch.device(device).index >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")

    class Stop(Exception):
        pass

    def init(backend, **kwargs):
        seen["backend"] = backend
        raise Stop

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(ddp_train.dist, "init_process_group", init)
    monkeypatch.setattr(ddp_train, "set_threads", lambda *a, **k: None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args = ddp_train.parse_args(["--nproc", "2", "--steps", "1"])
    with pytest.raises(Stop):
        ddp_train.run(1, 2, args, "tcp://127.0.0.1:1")
    assert seen["backend"] == "gloo"
    with pytest.raises(SystemExit, match="nccl needs a GPU per process: 2 processes"):
        ddp_train.run(1, 2, ddp_train.parse_args(["--backend", "nccl"]), "tcp://127.0.0.1:1")
