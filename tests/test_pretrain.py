import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, finish_agents, metrics, run_nodes, run_ok, start_agents
from conftest import pretrain_command as command

from babyllama.checkpoint import load_model
from model import ModelArgs, Transformer


def test_pretraining_lowers_validation_loss(corpus, small_tokenizer, tmp_path):
    out = tmp_path / "run"
    # A peak far below what the CPU does: MFU still never passes 100%.
    run_ok(command(corpus, small_tokenizer, out, "--max_steps=60", "--eval_interval=20", "--eval_batches=4",
                   "--peak_tflops=1e-6"))
    assert all(0 < m["mfu"] <= 1.0 for m in metrics(out) if "mfu" in m)
    vals = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert len(vals) == 3 and vals[-1] < vals[1] < vals[0] - 0.2
    assert all("val_bpc" in m for m in metrics(out) if "val_loss" in m)
    model, ckpt = load_model(str(out / "ckpt.pt"))
    assert ckpt["step"] == 60 and ckpt["stage"] == "pretrain"


@pytest.mark.parametrize("memory_options", [(), ("--loss_chunk=100", "--checkpoint_activations=true")],
                         ids=["plain", "chunked_checkpointed"])
def test_sigterm_then_resume_is_exact(corpus, small_tokenizer, tmp_path, memory_options):
    steps = 150
    args = (f"--max_steps={steps}", "--log_interval=1", "--eval_interval=100000", "--save_interval=100000",
            *memory_options)
    straight = tmp_path / "straight"
    run_ok(command(corpus, small_tokenizer, straight, *args))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(corpus, small_tokenizer, killed, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    _, ckpt = load_model(str(killed / "ckpt.pt"))  # the killed run left a loadable checkpoint
    stopped_at = ckpt["step"]
    assert 10 <= stopped_at < steps, "the run finished before the signal: make it longer"

    run_ok(command(corpus, small_tokenizer, killed, *args))
    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6, (x, y)
    wa = torch.load(straight / "ckpt.pt", weights_only=False)["model"]
    wb = torch.load(killed / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def schedule_of(out) -> dict:
    return torch.load(out / "ckpt.pt", weights_only=False)["schedule"]


def test_time_budget_ends_with_the_schedule_complete(corpus, small_tokenizer, tmp_path):
    """The process fits its steps into the budget (how well is tested on a simulated clock in
    test_budget.py): the schedule is fitted once, every step is run, and min_lr is reached on the last."""
    out = tmp_path / "budget"
    result = run_ok(command(corpus, small_tokenizer, out, "--time_budget_min=0.3", "--max_steps=1000000",
                            "--min_lr=1e-4", "--eval_interval=200", "--eval_batches=4", "--save_interval=500"))
    assert result.stdout.count("time budget 0.3 min:") == 1
    etas = [float(eta) for eta in re.findall(r"ETA ([0-9.]+) min", result.stdout)]
    assert etas and max(etas) <= 0.35, etas  # never the uncapped steps' hours
    assert "/1000000 " not in result.stdout
    rows = metrics(out)
    last = rows[-1]
    assert schedule_of(out)["fitted_to_budget"] and last["step"] == schedule_of(out)["max_steps"] > 20
    assert [m["step"] for m in rows] == list(range(1, last["step"] + 1))
    assert last["lr"] == pytest.approx(1e-4) and rows[-2]["lr"] > 1e-4  # min_lr reached at the last step


def test_a_budget_spent_in_start_up_says_so_instead_of_resume(corpus, small_tokenizer, tmp_path):
    """A budget that start-up and compilation use up ends before its schedule could be fitted: the run says
    that its learning rate never decayed and what to change, not that a rerun would continue it."""
    result = run_ok(command(corpus, small_tokenizer, tmp_path / "short", "--time_budget_min=0.001",
                            "--max_steps=1000000", "--eval_interval=1000", "--save_interval=1000"))
    said = [line for line in result.stdout.splitlines() if "before 5 steps could be timed" in line]
    assert len(said) == 1 and said[0].endswith("give a larger --time_budget_min"), result.stdout[-2000:]
    assert "rerun the same command" not in result.stdout


def test_time_budget_resume_keeps_the_fitted_steps(corpus, small_tokenizer, tmp_path):
    out = tmp_path / "budget"
    args = ("--time_budget_min=0.3", "--max_steps=1000000", "--min_lr=1e-4", "--log_interval=1",
            "--eval_interval=100000", "--save_interval=100000")
    proc = subprocess.Popen(command(corpus, small_tokenizer, out, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "ckpt.pt").exists():  # the fit saves the first checkpoint
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "time budget 0.3 min:" in stdout, stdout[-2000:]
    fitted = schedule_of(out)
    stopped_at = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert fitted["fitted_to_budget"] and stopped_at < fitted["max_steps"]

    # The resumed process gets a budget of its own, with room to spare: what is tested is that the schedule
    # is kept, not how fast this process runs.
    resumed = run_ok(command(corpus, small_tokenizer, out, *args, "--time_budget_min=1"))
    assert "time budget" not in resumed.stdout  # not fitted again
    assert schedule_of(out) == fitted
    rows = metrics(out)
    assert [m["step"] for m in rows] == list(range(1, fitted["max_steps"] + 1))
    assert rows[-1]["lr"] == pytest.approx(1e-4)


def torchrun(corpus, tokenizer, out, port, *extra, processes=2) -> subprocess.CompletedProcess:
    return run_ok([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={port}", *command(corpus, tokenizer, out, *extra)[1:]], timeout=300)


TWO_RANKS = ("--max_steps=6", "--log_interval=1", "--eval_interval=3", "--eval_batches=2", "--grad_accum=2")


@pytest.fixture(scope="module")
def one_process_double_batch(corpus, small_tokenizer, tmp_path_factory) -> list[dict]:
    """The metrics of one process with twice the batch: what two ranks (DDP or FSDP) must equal."""
    out = tmp_path_factory.mktemp("single")
    single = command(corpus, small_tokenizer, out, *TWO_RANKS)
    single[single.index("--batch_size=4")] = "--batch_size=8"
    run_ok(single)
    return metrics(out)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_with_double_batch(corpus, small_tokenizer, tmp_path, sharding,
                                                            one_process_double_batch):
    args = (*TWO_RANKS, f"--fsdp={sharding == 'fsdp'}")
    torchrun(corpus, small_tokenizer, tmp_path / "multi", 29517 + (sharding == "fsdp"), *args)
    multi, one = metrics(tmp_path / "multi"), one_process_double_batch
    assert len(multi) == len(one) == 6
    for x, y in zip(multi, one):
        assert abs(x["loss"] - y["loss"]) < 1e-5
        assert abs(x.get("val_loss", 0) - y.get("val_loss", 0)) < 1e-5
    # Two nodes of one process each (two torchrun agents meeting on loopback) are the same two ranks.
    first, _ = run_nodes([command(corpus, small_tokenizer, tmp_path / "nodes", *args)] * 2,
                         29521 + (sharding == "fsdp"))
    assert "is not one folder" not in first.stdout  # one out_dir: rank 0 alone writes
    assert [m["loss"] for m in metrics(tmp_path / "nodes")] == pytest.approx([m["loss"] for m in multi], abs=1e-6)
    if sharding == "ddp":  # saved by 2 processes, resumed by 1 and by 4: the same global batch, the data order on
        torchrun(corpus, small_tokenizer, tmp_path / "on1", 29515, *args, "--max_steps=3")
        shutil.copytree(tmp_path / "on1", tmp_path / "on4")
        odd = subprocess.run([*command(corpus, small_tokenizer, tmp_path / "on1", *args), "--batch_size=3"],
                             capture_output=True, text=True)
        assert odd.returncode == 1 and odd.stderr.strip().splitlines()[-1].endswith(
            "with 16 items a step: on 1 choose --batch_size x --grad_accum so that it times 1 is 16 "
            "(--batch_size=3 now)"), odd.stderr[-3000:]
        said = [run_ok(command(corpus, small_tokenizer, tmp_path / "on1", *args)).stdout,
                torchrun(corpus, small_tokenizer, tmp_path / "on4", 29516, *args, processes=4).stdout]
        assert "saved by 2 processes: on 1, --grad_accum=4 keeps its 16 items a step" in said[0]
        assert "saved by 2 processes: on 4, --grad_accum=1 keeps its 16 items a step" in said[1]
        for out in ("on1", "on4"):
            assert [m["loss"] for m in metrics(tmp_path / out)] == pytest.approx([m["loss"] for m in multi], abs=1e-5)
    if sharding == "fsdp":  # each node its own out_dir (found out, not told): both write, both resume
        local = [tmp_path / "node0", tmp_path / "node1"]
        run_nodes([command(corpus, small_tokenizer, out, *args, "--max_steps=3") for out in local], 29519)
        first, _ = run_nodes([command(corpus, small_tokenizer, out, *args) for out in local], 29520)
        assert "is not one folder that every node sees" in first.stdout
        assert [m["loss"] for m in metrics(local[0])] == pytest.approx([m["loss"] for m in multi], abs=1e-6)
        written = [load_model(str(out / "ckpt.pt"))[1] for out in local]
        assert written[0]["step"] == written[1]["step"] == 6
        assert all(torch.equal(written[0]["model"][k], written[1]["model"][k]) for k in written[0]["model"])


def test_a_node_without_the_checkpoint_says_so(corpus, small_tokenizer, tmp_path):
    local = [tmp_path / "node0", tmp_path / "node1"]
    run_nodes([command(corpus, small_tokenizer, out, "--max_steps=2") for out in local], 29523)
    os.remove(local[1] / "ckpt.pt")
    nodes = finish_agents(start_agents([command(corpus, small_tokenizer, out, "--max_steps=4") for out in local],
                                       29524))
    for rank, node in enumerate(nodes):
        assert node.returncode != 0
        assert f"error: rank {rank}: 1 of 2 processes see" in node.stderr, node.stderr[-3000:]


def test_a_node_that_never_arrives_ends_the_first_within_the_timeout(corpus, small_tokenizer, tmp_path):
    # As a cluster's launcher starts it (its environment, no torchrun): --dist_timeout_min bounds the wait.
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29525", "OMP_NUM_THREADS": "1"}
    began = time.time()
    alone = subprocess.run(command(corpus, small_tokenizer, tmp_path / "a", "--dist_timeout_min=0.05"), env=env,
                           capture_output=True, text=True, timeout=120)
    assert time.time() - began < 3 + 30  # the timeout, and the start of a Python process with torch
    assert alone.returncode == 1 and alone.stderr.strip().splitlines()[-1].startswith(
        "error: rank 0 of 2: lost the other processes"), alone.stderr[-3000:]
    # A wrong MASTER_ADDR (an address of documentation's test network: nothing answers there).
    env.update(RANK="1", MASTER_ADDR="192.0.2.1")
    began = time.time()
    lost = subprocess.run(command(corpus, small_tokenizer, tmp_path / "c", "--dist_timeout_min=0.05"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert time.time() - began < 3 + 30
    assert lost.returncode == 1 and lost.stderr.strip().splitlines()[-1].startswith(
        "error: rank 1 of 2: lost the other processes"), lost.stderr[-3000:]
    assert "reaches 192.0.2.1:29525" in lost.stderr
    # Under torchrun its agent waits at the rendezvous first: --rdzv_conf=timeout bounds that.
    began = time.time()
    agent = finish_agents(start_agents([command(corpus, small_tokenizer, tmp_path / "b")], 29526,
                                       "--rdzv_conf=timeout=3", nodes=2), timeout=120)[0]
    assert time.time() - began < 3 + 30
    assert agent.returncode != 0 and "1/2 clients joined" in agent.stderr.strip().splitlines()[-1]


def test_a_killed_rank_ends_the_other_node_and_the_run_resumes_exactly(corpus, small_tokenizer, tmp_path):
    # The rate is constant after warmup (min_lr = lr), so the losses do not depend on max_steps.
    args = ("--log_interval=1", "--save_interval=2", "--eval_interval=100000", "--min_lr=3e-3",
            "--dist_timeout_min=0.1")
    out = tmp_path / "killed"
    agents = start_agents([command(corpus, small_tokenizer, out, *args, "--max_steps=100000")] * 2, 29527)
    while not (out / "ckpt.pt").exists():
        assert agents[0].poll() is None, agents[0].communicate()[1][-3000:]
        time.sleep(0.01)
    with open(f"/proc/{agents[1].pid}/task/{agents[1].pid}/children") as f:  # the agent's worker: rank 1
        os.kill(int(f.read().split()[0]), signal.SIGKILL)
    began = time.time()
    first = finish_agents(agents, timeout=120)[0]
    assert time.time() - began < 6 + 20
    assert first.returncode != 0
    said = [line for line in first.stderr.splitlines() if line.startswith("error: ")]  # torchrun's report follows
    assert said and said[0].startswith("error: rank 0 of 2: lost the other processes ("), first.stderr[-3000:]
    step = load_model(str(out / "ckpt.pt"))[1]["step"]
    run_nodes([command(corpus, small_tokenizer, out, *args, f"--max_steps={step + 3}")] * 2, 29528)
    whole = tmp_path / "whole"
    run_nodes([command(corpus, small_tokenizer, whole, *args, f"--max_steps={step + 3}")] * 2, 29529)
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(whole)]


def test_the_slurm_script_starts_every_node(corpus, small_tokenizer, tmp_path):
    # SLURM's commands, as far as docs/slurm/train.sbatch uses them: srun starts the task on every node at once.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"srun": 'while [[ $1 == --* ]]; do shift; done\n'
                     'for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" & done\n'
                     'status=0; for task in $(jobs -p); do wait "$task" || status=1; done; exit $status',
             "scontrol": "echo 127.0.0.1",
             "torchrun": f'exec "{sys.executable}" -m torch.distributed.run "$@"'}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1",
           "SLURM_JOB_NODELIST": "node[1-2]", "CONFIG": "", "MASTER_PORT": "29535", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    result = subprocess.run(["bash", os.path.join(ROOT, "docs", "slurm", "train.sbatch"),
                             *command(corpus, small_tokenizer, out, "--max_steps=3")[2:]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("2 process(es) on cpu") == 1  # rank 0 of the two nodes speaks
    assert load_model(str(out / "ckpt.pt"))[1]["step"] == 3


def test_errors_are_one_line(corpus, small_tokenizer, chatglm_path, tmp_path):
    result = subprocess.run(command(corpus, chatglm_path, tmp_path / "x", "--max_steps=1"), capture_output=True,
                            text=True)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(
        "error: ") and "made with tokenizer" in result.stderr
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path / "x", "--max_steps=1", "--data=nowhere"),
                            capture_output=True, text=True)
    assert result.stderr.strip().splitlines() == ["error: no corpus at nowhere: run data_process.py first"]


def test_init_reaches_the_model(corpus, small_tokenizer, tmp_path):
    """--init=zero: after one step at a negligible learning rate, the residual projections are still zero."""
    out = tmp_path / "zero"
    run_ok(command(corpus, small_tokenizer, out, "--max_steps=1", "--warmup_steps=0", "--lr=1e-12", "--min_lr=0",
                   "--init=zero"))
    model, _ = load_model(str(out / "ckpt.pt"))
    assert all(layer.attention.wo.weight.abs().max() < 1e-6 for layer in model.layers)
    assert all(layer.feed_forward.w2.weight.abs().max() < 1e-6 for layer in model.layers)
    assert all(layer.feed_forward.w3.weight.std() > 0.01 for layer in model.layers)
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path / "x", "--init=xavier"), capture_output=True,
                            text=True)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--init=xavier: must be one of seed, gpt2, zero" in result.stderr


def test_document_mask_reaches_the_model(corpus, small_tokenizer, tmp_path):
    """--document_mask: the same first step (same weights, same batch) has another loss, the documents no
    longer reading the ones before them in a window."""
    losses = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        run_ok(command(corpus, small_tokenizer, out, "--max_steps=1", "--log_interval=1", f"--document_mask={flag}"))
        losses.append(next(m["loss"] for m in metrics(out) if "loss" in m))
    assert losses[0] != pytest.approx(losses[1], abs=1e-4)


def test_seq_len_warmup_trains_on_the_windows_first_quarters_then_whole(corpus, small_tokenizer, tmp_path):
    """--seq_len_warmup=3 with windows of 32: steps 1-3 train on the first 8, 16, 24 tokens of each window."""
    out = tmp_path / "warm"
    run_ok(command(corpus, small_tokenizer, out, "--max_steps=5", "--log_interval=1", "--seq_len_warmup=3",
                   "--peak_tflops=1000"))
    steps = [m for m in metrics(out) if "loss" in m]
    tokens = [m["tokens"] for m in steps]
    assert [b - a for a, b in zip([0, *tokens], tokens)] == [4 * 8, 4 * 16, 4 * 24, 4 * 32, 4 * 32]
    # MFU counts each step's FLOPs a token at its own length: attention's share grows linearly with it.
    flops = [m["mfu"] / m["tokens_per_s"] for m in steps]
    growth = [b - a for a, b in zip(flops, flops[1:])]
    assert growth[0] > 0 and growth == pytest.approx([growth[0]] * 3 + [0], rel=1e-6, abs=1e-6 * growth[0])


# The shapes the figures and the seed's released weights rely on: (dim, layers, heads, ids, window).
RECIPE_SHAPES = [("pretrain_tiny", "tiny_shallow", (256, 3, 4, 8192, 256)),
                 ("pretrain_baby_92m", "baby_92m", (512, 8, 8, 64793, 512)),
                 ("pretrain_baby_218m", "baby_218m", (1024, 12, 8, 64793, 1024))]


@pytest.mark.parametrize("recipe,model,shape", RECIPE_SHAPES)
def test_recipes_train_the_shapes_they_name(recipe, model, shape):
    from babyllama.configurator import parse_config
    from pretrain import Config, build_model_args
    cfg = parse_config(Config, [os.path.join(ROOT, "config", f"{recipe}.py"), "--max_steps=7"], check_files=False)
    assert cfg.max_steps == 7 and cfg.model == model
    args = build_model_args(cfg)
    assert (args.dim, args.n_layers, args.n_heads, args.vocab_size, args.max_seq_len) == shape


def test_a_misspelled_preset_setting_is_one_line(corpus, small_tokenizer, tmp_path):
    """n_layer for n_layers used to train the default 8 layers without a word."""
    typo = tmp_path / "typo.py"
    typo.write_text((corpus / "preset.py").read_text().replace("n_layers", "n_layer"))
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path / "x", f"--model={typo}", "--max_steps=1"),
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: config file {typo}: unknown settings ['n_layer']"]
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_a_preset_value_of_the_wrong_type_is_one_line_naming_it(tmp_path):
    """qk_norm = "no" used to switch QK-norm on (a non-empty string is true) without a word."""
    from babyllama.configurator import SettingError, read_model_preset
    for line, expected in (('qk_norm = "no"', "--qk_norm='no': expected bool"),
                           ("dim = 25.5", "--dim=25.5: expected int"),
                           ("n_kv_heads = None\nrope_theta = 500000", None)):
        preset = tmp_path / "preset.py"
        preset.write_text(line + "\n")
        if expected is None:  # None where the field allows it, an int for a float
            assert read_model_preset(str(preset)).rope_theta == 500000.0
            continue
        with pytest.raises(SettingError) as e:
            read_model_preset(str(preset))
        assert str(e.value) == f"model preset {preset}: {expected}"


def test_help_lists_settings():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "--grad_accum" in result.stdout
    assert "micro-steps per optimizer step" in result.stdout


def test_a_bad_init_from_is_one_line_naming_it(corpus, small_tokenizer, tmp_path):
    truncated = tmp_path / "half.pt"
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=32, multiple_of=16)
    torch.save({"model": Transformer(args).state_dict(), "model_args": vars(args)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path / "out", f"--init_from={truncated}",
                                    "--max_steps=2"), capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(truncated) in last


def test_temp_files_of_a_killed_run_are_removed(corpus, small_tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f"ckpt_0000500.pt.tmp{dead}", "ckpt.pt.link", "metrics.jsonl.tmp", "notes.txt"):
        (out / name).write_bytes(b"x")
    result = run_ok(command(corpus, small_tokenizer, out, "--max_steps=2"))
    assert f"removed {out / f'ckpt_0000500.pt.tmp{dead}'}, left by an interrupted run" in result.stdout
    assert sorted(os.listdir(out)) == ["ckpt.pt", "ckpt_0000002.pt", "metrics.jsonl", "notes.txt"]
