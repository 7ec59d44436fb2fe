import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CHATGLM_MODEL = os.path.join(ROOT, "..", "shared", "chatglm_tokenizer", "tokenizer.model")

# Under pytest-xdist (`make test` runs two workers) each worker gets one of the two cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def chatglm_path() -> str:
    if not os.path.isfile(CHATGLM_MODEL):
        pytest.skip(f"ChatGLM2 tokenizer.model not found at {CHATGLM_MODEL} "
                    "(see chatglm_tokenizer/README.md for where to get it)")
    return CHATGLM_MODEL


POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "人民日报记者报道，今年全国粮食产量再创新高，农民收入稳步增长。",
    "中国人民银行宣布下调存款准备金率，以保持流动性合理充裕。",
    "Hello 1998年1月1日。",
]


def write_corpus(path, n_docs: int = 300) -> list[str]:
    """A text file of n_docs distinct documents, one a line: a real line after 40 characters drawn at
    random from the real lines (so that no two documents are near duplicates)."""
    import random
    rng = random.Random(0)
    chars = sorted(set("".join(POEMS)))
    docs = []
    for i in range(n_docs):
        docs.append(f"第{i}篇：" + "".join(rng.choice(chars) for _ in range(40)) + rng.choice(POEMS))
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return docs


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> str:
    """A 600-id SentencePiece BPE model of ours, trained on a small corpus (about a second)."""
    from train_tokenizer import Config, train
    folder = tmp_path_factory.mktemp("tok")
    write_corpus(folder / "corpus.txt", 500)
    out = folder / "tokenizer.model"
    train(Config(sources="", inputs=f"txt:{folder / 'corpus.txt'}", out=str(out), vocab_size=600,
                 compare_with="", character_coverage=1.0))
    return str(out)


def write_csv(path, header: list[str], rows) -> None:
    """A CSV file as the SFT, preference and evaluation scripts read it."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------- a tiny corpus and models, made once a session

PRESET = "dim = 64\nn_layers = 2\nn_heads = 4\nvocab_size = 600\nmax_seq_len = 32\nmultiple_of = 16\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, small_tokenizer):
    """A folder with data/ (train.bin, val.bin, meta.json of 600 documents, our small tokenizer) and
    preset.py (a 2-layer model preset for that tokenizer)."""
    from data_process import Config, process
    folder = tmp_path_factory.mktemp("pretrain")
    write_corpus(folder / "corpus.txt", 600)
    process(Config(sources="", inputs=f"txt:{folder / 'corpus.txt'}", out_dir=str(folder / "data"),
                   tokenizer=small_tokenizer, val_fraction=0.1))
    (folder / "preset.py").write_text(PRESET)
    return folder


def pretrain_command(corpus, tokenizer, out, *extra) -> list[str]:
    """pretrain.py on the corpus fixture, float32, with extra flags."""
    return [sys.executable, os.path.join(ROOT, "pretrain.py"), f"--data={corpus / 'data'}", f"--tokenizer={tokenizer}",
            f"--model={corpus / 'preset.py'}", f"--out_dir={out}", "--dtype=float32", "--peak_tflops=1",
            "--batch_size=4", "--warmup_steps=5", "--lr=3e-3", *extra]


def metrics(out) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_ok(cmd, env=None, **kw) -> subprocess.CompletedProcess:
    """Run a command on one thread (in env, else this environment); its stderr is the failure message when
    it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, env={**(env or os.environ), "OMP_NUM_THREADS": "1"},
                            **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start_agents(commands: list[list[str]], port: int, *torchrun_flags: str, nodes: int = 0) -> list[subprocess.Popen]:
    """One torchrun agent per command (a python script and its flags), each a node of its own (one
    process each) of a job of `nodes` nodes (0: one per command) meeting at 127.0.0.1:port, as hosts of
    a cluster would start them; each in a session of its own, so that a test can kill one node whole."""
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes or len(commands)}",
                              f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                              f"--master_port={port}", *torchrun_flags, *cmd[1:]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             start_new_session=True)
            for node, cmd in enumerate(commands)]


def finish_agents(agents: list[subprocess.Popen], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Wait for the agents (started by start_agents) and return what each printed."""
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return results


def run_nodes(commands: list[list[str]], port: int) -> list[subprocess.CompletedProcess]:
    """Run commands as the nodes of one job (start_agents), check that every node succeeds, and return
    what each printed."""
    nodes = finish_agents(start_agents(commands, port))
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    return nodes


@pytest.fixture(scope="session")
def pretrained(corpus, small_tokenizer, tmp_path_factory):
    """(ckpt.pt of 10 pretraining steps on the corpus, a folder with SFT train.csv and val.csv)."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_ok(pretrain_command(corpus, small_tokenizer, out, "--max_steps=10", "--eval_interval=100000"))
    data = tmp_path_factory.mktemp("sft")
    for name, n in (("train.csv", 64), ("val.csv", 8)):
        write_csv(data / name, ["prompt", "answer", "history"],
                  [[f"第{i}首诗的下一句是什么？", "春眠不觉晓，处处闻啼鸟。" if i % 2 else "床前明月光。", "[]"]
                   for i in range(n)])
    return out / "ckpt.pt", data


@pytest.fixture(scope="session")
def lookup_tables(tmp_path_factory) -> str:
    """download_data.py's idiom and dictionary files as the package writes them (a BOM-less JSON list,
    pinyin with the IPA letter ɡ), with made-up entries; one idiom with a meaning too long for a task."""
    raw = tmp_path_factory.mktemp("raw")
    (raw / "idioms").mkdir()
    (raw / "dictionary").mkdir()
    rng = random.Random(0)
    chars = [chr(0x4e00 + i) for i in range(400)]
    idioms = [{"word": "".join(rng.sample(chars, 4)), "pinyin": "x", "explanation": f"第{i}个意思，很好。",
               "derivation": "无", "example": "无", "abbreviation": "x"} for i in range(300)]
    idioms.append({"word": "画蛇添足", "pinyin": "huà shé tiān zú", "explanation": "长" * 60})
    readings = [{"word": c, "pinyin": f"p{i}ɡ", "explanation": f"{c} 1.一个字。"} for i, c in enumerate(chars)]
    (raw / "idioms" / "idioms.json").write_text(json.dumps(idioms, ensure_ascii=False), encoding="utf-8")
    (raw / "dictionary" / "dictionary.json").write_text(json.dumps(readings, ensure_ascii=False), encoding="utf-8")
    return str(raw)


@pytest.fixture(scope="session")
def preference(tmp_path_factory):
    """Trivially separable preference pairs (train.csv, val.csv) and GRPO prompts (prompts.csv)."""
    folder = tmp_path_factory.mktemp("pref")
    for name, n in (("train.csv", 48), ("val.csv", 16)):
        write_csv(folder / name, ["prompt", "chosen", "rejected"],
                  [[f"第{i}个问题", "春眠不觉晓，处处闻啼鸟。", "白日依山尽"] for i in range(n)])
    write_csv(folder / "prompts.csv", ["prompt", "answer", "history"],
              [[f"成语“{word}”是什么意思？", "比喻做多余的事", "[]"]
               for word in ("画蛇添足", "守株待兔", "亡羊补牢", "对牛弹琴")])
    return folder


def stage_flags(ckpt, tokenizer, out) -> list[str]:
    """The flags every post-training stage's test gives: the start, the tokenizer, float32."""
    return [f"--init_from={ckpt}", f"--tokenizer={tokenizer}", f"--out_dir={out}", "--dtype=float32",
            "--peak_tflops=1", "--log_interval=1"]


def scrambled(args, std: float = 0.05):
    """A model of args with its matrices drawn at std (seed 0), in eval mode: large enough random weights
    that its logits and greedy outputs differ from position to position, unlike a fresh tied model's."""
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def transformers_agrees(model, folder, tokens: torch.Tensor, prompt_len: int, new_tokens: int):
    """The transformers model that export.py wrote to folder: its float32 logits of tokens are model's within
    1e-4, and its greedy continuation of the first row's first prompt_len tokens is model's. Returns it."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    prompt = tokens[:1, :prompt_len]
    with torch.no_grad():
        assert (model(tokens)[0] - hf(input_ids=tokens).logits).abs().max() < 1e-4
        ours = model.generate([prompt[0].tolist()], new_tokens, eos_id=None)[0]
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)[0, prompt_len:].tolist()
    assert ours == theirs
    return hf


# ---------------------------------------------------------------- a tiny model and batches for the trainer's tests

TRAINER_ARGS = dict(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16, multiple_of=16)


def fresh_model(seed=0, **overrides):
    """The tiny model with the weights of seed (overrides: other ModelArgs, e.g. experts)."""
    from model import ModelArgs, Transformer
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**{**TRAINER_ARGS, **overrides}))


def batch(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (n, 16), generator=g)
    return x, torch.roll(x, -1, 1)


def loss_fn(model, b):
    return model(b[0], b[1])[1]


def settings(**kw):
    """A TrainConfig for the tiny model: float32, 20 steps, a warmup of 2."""
    from babyllama.trainer import TrainConfig
    return TrainConfig(**{"lr": 1e-2, "min_lr": 1e-4, "warmup_steps": 2, "max_steps": 20, "weight_decay": 0.1,
                          "dtype": "float32", **kw})
