"""``peftfast bench`` / ``peftfast info`` and the exact counters they use (saved bytes, work ops)."""

import json
import subprocess
import sys

import pytest
import torch

from peftfast import cli
from peftfast.bench import count_work_ops, saved_activation_bytes


def test_saved_bytes_counts_each_storage_once_and_skips_excluded():
    a = torch.randn(10, requires_grad=True)
    w = torch.randn(10)
    _, saved = saved_activation_bytes(lambda: (a * a).sum())
    assert saved.total == a.nbytes  # a is saved twice by mul, held once
    _, saved = saved_activation_bytes(lambda: (a * a).sum(), exclude=[a])
    assert saved.total == 0
    _, saved = saved_activation_bytes(lambda: (a.exp() * w).sum())
    assert saved.total == a.nbytes + w.nbytes  # exp saves its result, mul saves w


def test_work_ops_skip_views_and_allocations():
    x = torch.randn(4, 6)

    def fn():
        y = torch.empty(4, 6)
        y.copy_(x)
        return (y.t() @ x.view(4, 6)).sum()

    _, ops = count_work_ops(fn)
    assert dict(ops.aten) == {"copy_": 1, "mm": 1, "sum": 1}
    assert ops.total == 3


def test_bench_cli_runs_and_writes_outputs(tmp_path, capsys):
    rc = cli.main(["bench", "--steps", "2", "--seq-len", "16", "--dropout", "0", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "peft " in out and "peftfast " in out and "ratio" in out
    res = json.loads((tmp_path / "bench.json").read_text())
    peft, fast = res["results"]
    assert (peft["method"], fast["method"]) == ("peft", "peftfast")
    assert len(fast["losses"]) == 3  # warm-up + 2 timed steps
    assert fast["max_abs_loss_diff_vs_peft"] < 1e-4  # fp32, dropout 0: same losses step by step
    assert fast["saved_mb"] <= peft["saved_mb"]
    assert res["config"]["model"] == "tiny" and res["versions"]["torch"] == torch.__version__
    assert (tmp_path / "bench.csv").read_text().count("\n") == 3
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_dropout_saves_less_than_peft(tmp_path):
    assert cli.main(["bench", "--steps", "1", "--seq-len", "16", "--dropout", "0.1", "--quiet", "--out",
                     str(tmp_path)]) == 0
    peft, fast = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert fast["saved_mb"] < 0.8 * peft["saved_mb"]  # no dropout copies of the layer inputs
    assert fast["work_ops_per_step"] < peft["work_ops_per_step"] * 1.5
    assert fast["max_abs_loss_diff_vs_peft"] < 0.05 * abs(peft["losses"][0])  # other masks, same model and data


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "gpt-9"], "unknown preset 'gpt-9'"),
        (["bench", "--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["bench", "--rank", "0"], "--rank must be in 1..256"),
        (["bench", "--seq-len", "1"], "impossible shape"),
        (["bench", "--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_bench_cli_bad_input_is_one_line(argv, message, capsys):
    assert cli.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_bench_cli_gpu_request_without_gpu(capsys):
    assert cli.main(["bench", "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_info_command_reports_versions_and_backends():
    proc = subprocess.run([sys.executable, "-m", "peftfast", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"torch        {torch.__version__}" in proc.stdout
    assert "triton path" in proc.stdout and "peftfast._C" in proc.stdout
