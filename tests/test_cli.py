"""The command line, run in-process (and once as ``python -m gpuconv``)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import gpuconv
from gpuconv import cli
from gpuconv.device import CudaUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- params

def test_params_json_prints_the_notes_numbers(capsys):
    code, out, err = run(capsys, "params", "--json")
    assert code == 0 and err == ""
    numbers = json.loads(out)
    assert numbers["fully_connected"] == 25_000_000_000
    assert numbers["locally_connected"] == 10_000_000
    assert numbers["shared_per_filter"] == 100
    assert numbers["shared_total"] == 6400
    assert numbers["local_vs_full"] == 1 / 2500
    assert numbers["local_vs_full_fraction"] == "1/2500"
    assert numbers["sharing_reduction"] == 1e5
    assert (numbers["height"], numbers["width"], numbers["neurons"]) == (500, 500, 100_000)
    assert (numbers["field"], numbers["filters"]) == ([10, 10], 64)


def test_params_table(capsys):
    code, out, _ = run(capsys, "params")
    assert code == 0
    for text in ("fully connected", "25,000,000,000", "locally connected, 10 x 10 field",
                 "10,000,000", "shared, with 64 filters", "6,400", "1/2500", "100,000x"):
        assert text in out, text


def test_params_options(capsys):
    code, out, _ = run(capsys, "params", "--height", "28", "--width", "28", "--neurons", "300",
                       "--field", "3", "5", "--filters", "7", "--json")
    assert code == 0
    numbers = json.loads(out)
    assert numbers["fully_connected"] == 235_200
    assert numbers["locally_connected"] == 4500
    assert numbers["shared_total"] == 105
    assert numbers["field"] == [3, 5]


def test_params_square_field_and_written_integers(capsys):
    code, out, _ = run(capsys, "params", "--field", "3", "--neurons", "1e5", "--json")
    assert code == 0
    numbers = json.loads(out)
    assert numbers["field"] == [3, 3]
    assert numbers["neurons"] == 100_000


@pytest.mark.parametrize("argv, message", [
    (["params", "--height", "0"], "--height: must be >= 1"),
    (["params", "--width", "-3"], "--width"),
    (["params", "--neurons", "lots"], "--neurons: expected a positive integer"),
    (["params", "--filters", "2.5"], "--filters: expected a positive integer"),
    (["params", "--field", "3", "3", "3"], "--field: expected KH or KH KW"),
    (["params", "--bogus"], "unrecognized arguments"),
    (["params", "--height", "28", "--width", "28", "--field", "29", "3"],
     "the receptive field (29 x 3) is larger than the image (28 x 28)"),
    (["params", "--width", "8", "--field", "5", "9"], "larger than the image"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err


def test_a_field_as_large_as_the_image_is_fine(capsys):
    code, out, _ = run(capsys, "params", "--height", "5", "--width", "7", "--field", "5", "7",
                       "--json")
    assert code == 0 and json.loads(out)["locally_connected"] == 35 * 100_000


def test_no_command_prints_the_help(capsys):
    code, out, err = run(capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: gpuconv")
    for command in ("info", "params", "bench"):
        assert command in err


# ----------------------------------------------------------------------------- info

def test_info_runs(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0 and err == ""
    for label in ("gpuconv:", "Python:", "NumPy:", "Numba:", "numba-cuda:", "CUDA available:",
                  'device="auto":', "GPUCONV_DEVICE:", "torch (optional):",
                  "cupy (optional):", "matplotlib (optional):"):
        assert label in out, label
    assert gpuconv.__version__ in out


def test_info_json(capsys):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["gpuconv"] == gpuconv.__version__
    assert info["numpy"] is not None and info["numba"] is not None
    assert isinstance(info["cuda_available"], bool)
    assert info["device_auto"].split()[0] in ("cpu", "cuda")
    assert info["gpuconv_device_env"] is None
    assert set(info["peers"]) == set(cli.PEERS)
    if not info["cuda_available"]:
        assert info["gpu"] is None


def test_info_reports_the_environment_override(capsys, monkeypatch):
    monkeypatch.setenv("GPUCONV_DEVICE", "cpu")
    info = json.loads(run(capsys, "info", "--json")[1])
    assert info["gpuconv_device_env"] == "cpu"
    assert info["device_auto"].startswith("cpu (GPUCONV_DEVICE='cpu' overrides")


def test_info_survives_a_bad_environment_value(capsys, monkeypatch):
    monkeypatch.setenv("GPUCONV_DEVICE", "gpu")
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "must be one of 'auto', 'cpu', 'cuda'" in out


def test_info_says_not_installed(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_module_version", lambda name: None)
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "cupy (optional):" in out and "not installed" in out


# ----------------------------------------------------------------------------- help, version

def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("info", "params", "bench"):
        assert command in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and gpuconv.__version__ in out


# ----------------------------------------------------------------------------- bench

def test_without_bench_module_the_rest_still_works(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_import_bench", lambda: None)
    assert run(capsys, "--help")[0] == 0
    assert run(capsys, "params", "--json")[0] == 0
    code, _, err = run(capsys, "bench", "--sizes", "small")
    assert code == 2
    assert err.startswith("gpuconv bench: error:") and "gpuconv.bench" in err


def _fake_bench(run_):
    def add_arguments(parser):
        parser.add_argument("--repeat", type=int, default=3)
    return types.SimpleNamespace(add_arguments=add_arguments, run=run_)


def test_bench_is_delegated(capsys, monkeypatch):
    seen = {}

    def run_(args):
        seen["repeat"] = args.repeat
        return 0

    monkeypatch.setattr(cli, "_import_bench", lambda: _fake_bench(run_))
    assert run(capsys, "bench", "--repeat", "7")[0] == 0
    assert seen == {"repeat": 7}


def test_bench_is_loaded_only_when_selected(capsys, monkeypatch):
    def fail():
        raise AssertionError("gpuconv.bench imported for another subcommand")

    monkeypatch.setattr(cli, "_import_bench", fail)
    assert run(capsys, "params")[0] == 0
    assert run(capsys, "info")[0] == 0


def test_argument_errors_a_command_finds_are_its_exit_status(capsys, monkeypatch):
    def run_(args):
        print("gpuconv bench: error: --json /nowhere/x.json: cannot write there", file=sys.stderr)
        return 2

    monkeypatch.setattr(cli, "_import_bench", lambda: _fake_bench(run_))
    code, _, err = run(capsys, "bench")
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize("error", [
    CudaUnavailableError("device='cuda' needs a usable CUDA GPU"),
    ValueError("sizes must be positive"),
    TypeError("unsupported operand type(s)"),
])
def test_a_bug_inside_bench_is_not_turned_into_a_usage_error(monkeypatch, error):
    """Only argument errors become exit status 2; an exception raised while the benchmark
    runs propagates, so that the program shows its traceback."""
    def run_(args):
        raise error

    monkeypatch.setattr(cli, "_import_bench", lambda: _fake_bench(run_))
    with pytest.raises(type(error)):
        cli.main(["bench"])


# ----------------------------------------------------------------------------- as a program

def test_python_dash_m_gpuconv():
    env = dict(os.environ)
    env.pop("GPUCONV_DEVICE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    result = subprocess.run([sys.executable, "-m", "gpuconv", "params", "--json"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout)
    assert numbers["fully_connected"] == 25_000_000_000
    assert numbers["local_vs_full_fraction"] == "1/2500"

    result = subprocess.run([sys.executable, "-m", "gpuconv", "params", "--height", "0"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--height: must be >= 1" in result.stderr

    result = subprocess.run([sys.executable, "-m", "gpuconv"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: gpuconv") and "bench" in result.stderr


def test_a_bug_in_bench_shows_its_traceback(tmp_path):
    """As a program: an exception inside the benchmark is printed with its traceback."""
    env = dict(os.environ)
    env.pop("GPUCONV_DEVICE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    code = ("import sys, gpuconv.bench.timing as b\n"
            "def broken(*a, **k):\n"
            "    raise ZeroDivisionError('a bug')\n"
            "b.run_benchmark = broken\n"
            "from gpuconv.cli import main\n"
            "sys.exit(main(['bench', '--device', 'cpu', '--quick']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith("ZeroDivisionError: a bug")


# ----------------------------------------------------------------------------- the GPU line

@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H200", "NVIDIA H200 (compute capability 9.0)"),
    (b"Tesla T4", "Tesla T4 (compute capability 9.0)"),  # older numba-cuda: bytes
])
def test_info_names_the_gpu(capsys, monkeypatch, name, expected):
    from numba import cuda

    fake = types.SimpleNamespace(name=name, compute_capability=(9, 0))
    monkeypatch.setattr(cuda, "get_current_device", lambda: fake)
    monkeypatch.setattr("gpuconv.device.cuda_available", lambda: True)
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["cuda_available"] is True
    assert info["gpu"] == expected
    assert "GPU:" in run(capsys, "info")[1]


def test_info_survives_a_failing_device_query(monkeypatch):
    from numba import cuda

    def broken():
        raise RuntimeError("driver gone")

    monkeypatch.setattr(cuda, "get_current_device", broken)
    assert cli.gpu_description() is None


@pytest.mark.parametrize("command", [["params"], ["info"]])
def test_a_closed_pipe_ends_quietly(command):
    """``gpuconv params | head -1``: no BrokenPipeError traceback."""
    script = ("import sys\nfrom gpuconv import cli\nsys.exit(cli.main(sys.argv[1:]))\n")
    reader = subprocess.Popen([sys.executable, "-c", script, *command],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    reader.stdout.readline()
    reader.stdout.close()  # the reader goes away after one line, as head -1 does
    err = reader.stderr.read().decode()
    reader.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert reader.returncode in (0, 141)


def test_train_on_a_missing_gpu_is_one_line(capsys, monkeypatch):
    pytest.importorskip("torch")
    from gpuconv import device as _device

    monkeypatch.setattr(_device, "_cuda_status", lambda: (False, "no GPU (test)"))
    code = cli.main(["train", "--device", "cuda", "--quick"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no GPU (test)" in err


def test_params_shows_the_dial(capsys):
    code, out, _ = run(capsys, "params")
    assert code == 0
    for text in ("Sharing as a dial", "tiles 1 x 1 (shared)", "tiles 256 x 256", "6,553,600",
                 "one per neuron (locally connected)"):
        assert text in out, text
    code, out, _ = run(capsys, "params", "--json")
    dial = json.loads(out)["dial"]
    assert dial[0]["weights"] == 100 and dial[-1]["weights"] == 10_000_000
