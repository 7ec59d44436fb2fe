import pytest

from babyllama import precision
from babyllama.common import pick_device
from babyllama.precision import choose_cpu_dtype, matmul_flops, measure_peak_flops, resolve_dtype


def test_cpu_dtype_follows_the_probe():
    # An AVX2 CPU emulates bfloat16 (measured there: 1.9 against 85 GFLOP/s); AVX-512 bf16 has it natively.
    assert choose_cpu_dtype("AVX2", 85e9, 1.9e9) == ("float32", "cpu AVX2, float32 (bfloat16 matmul 45x slower here)")
    assert choose_cpu_dtype("AVX512", 67e9, 172e9) == ("bfloat16",
                                                       "cpu AVX512, bfloat16 (bfloat16 matmul 2.6x float32 here)")
    assert choose_cpu_dtype("AVX512", 80e9, 85e9)[0] == "float32"  # no clear gain: keep float32's accuracy
    slow, fast = (lambda: (85e9, 1.9e9)), (lambda: (67e9, 172e9))
    assert resolve_dtype("auto", "cpu", cpu_probe=slow)[0] == "float32"
    assert resolve_dtype("auto", "cpu", cpu_probe=fast)[0] == "bfloat16"
    dtype, reason = resolve_dtype("bfloat16", "cpu", cpu_probe=slow)  # asked for: kept, with a hint
    assert dtype == "bfloat16" and "--dtype=auto would choose float32" in reason
    assert resolve_dtype("float32", "cpu", cpu_probe=fast) == ("float32", "cpu, float32 as asked")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "cpu")


def test_the_cpu_probe_sees_through_a_busy_moment(monkeypatch):
    """A round of the probe slowed by other work (here the first bfloat16 one) does not decide the dtype:
    each dtype's best round does."""
    readings = {"float32": [70e9] * precision.PROBE_ROUNDS,
                "bfloat16": [50e9] + [170e9] * (precision.PROBE_ROUNDS - 1)}
    order = []

    def fake_flops(device, dtype, seconds, n):
        order.append(dtype)
        return readings[dtype].pop(0)

    monkeypatch.setattr(precision, "matmul_flops", fake_flops)
    float32_flops, bfloat16_flops = precision.cpu_matmul_probe.__wrapped__()
    assert (float32_flops, bfloat16_flops) == (70e9, 170e9)
    assert order == ["float32", "bfloat16"] * precision.PROBE_ROUNDS  # in turn, not one dtype's rounds at once
    assert choose_cpu_dtype("AVX512", float32_flops, bfloat16_flops)[0] == "bfloat16"


def test_device_and_dtype_on_apple_gpus():
    assert pick_device("auto", cuda=True, mps=True) == "cuda"
    assert pick_device("auto", cuda=False, mps=True) == "mps"
    assert pick_device("auto", cuda=False, mps=False) == "cpu"
    assert pick_device("cpu", cuda=True, mps=True) == "cpu"
    assert resolve_dtype("auto", "mps", bf16_on_mps=True)[0] == "bfloat16"
    assert resolve_dtype("auto", "mps", bf16_on_mps=False)[0] == "float16"


def test_mfu_peak_is_never_below_float32s(monkeypatch):
    # A dtype slower than float32 (bfloat16 on an AVX2 CPU) must not lower the peak, or MFU passes 100%.
    import babyllama.precision as precision
    measured = {"bfloat16": 1.9e9, "float32": 85e9}  # as on an AVX2 CPU (a real float16 probe takes minutes)
    monkeypatch.setattr(precision, "matmul_flops", lambda device, dtype, seconds=1.0: measured[dtype])
    assert measure_peak_flops("cpu", "bfloat16") == 85e9
    measured["bfloat16"] = 170e9  # AVX-512 bf16: its own peak
    assert measure_peak_flops("cpu", "bfloat16") == 170e9
    # FLOP/s, not FLOPs or seconds: a CPU core does between 0.1 and 10,000 GFLOP/s of float32.
    assert 1e8 < matmul_flops("cpu", "float32", seconds=0.01, n=64) < 1e13
