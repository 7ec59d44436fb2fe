import copy
import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT, scrambled, transformers_agrees, write_corpus

from babyllama.configurator import read_model_preset
from export import export_hf, import_hf, permute_from_hf, permute_to_hf
from model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")


def test_permutation_round_trips():
    w = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 2), 2), w)
    # head 0 rows (0, 1, 2, 3) = pairs (0, 1), (2, 3) -> halves (0, 2), (1, 3)
    assert permute_to_hf(w, 2)[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]


@pytest.mark.parametrize("shape", ["tiny_gqa", "tiny_untied", "baby_92m"])
def test_transformers_gives_our_logits_and_greedy_tokens(tmp_path, shape):
    if shape == "baby_92m":
        args = read_model_preset("baby_92m", max_seq_len=128)
    else:
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=600, max_seq_len=128,
                         multiple_of=16, tie_embeddings=shape != "tiny_untied")
    model = scrambled(args)
    export_hf(model, None, str(tmp_path / "hf"))
    hf = transformers_agrees(model, tmp_path / "hf", torch.randint(3, args.vocab_size, (2, 24)), 24, 64)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings == args.tie_embeddings
    back = import_hf(str(tmp_path / "hf"))
    same = {k: v for k, v in asdict(back.args).items() if k != "multiple_of"}  # hidden_dim is explicit
    assert same == {k: v for k, v in asdict(model.args).items() if k != "multiple_of"}
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_cli_export_with_tokenizer_and_import(tmp_path, small_tokenizer):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=64, multiple_of=16)
    model = scrambled(args)
    torch.save({"model": model.state_dict(), "model_args": asdict(args)}, tmp_path / "ckpt.pt")
    out = tmp_path / "hf"
    run = subprocess.run([sys.executable, f"{ROOT}/export.py", f"--ckpt={tmp_path / 'ckpt.pt'}",
                          f"--tokenizer={small_tokenizer}", f"--out={out}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert not list(out.glob("*.py")), "a tokenizer we trained must load with no custom code"
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert type(tok).__name__ == "LlamaTokenizer"
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False)
    assert text == "你好<s>"
    again = subprocess.run([sys.executable, f"{ROOT}/export.py", f"--import_from={out}", f"--out={tmp_path}/back.pt"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    from babyllama.checkpoint import load_model
    back, _ = load_model(str(tmp_path / "back.pt"))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    refuse = subprocess.run([sys.executable, f"{ROOT}/export.py", f"--ckpt={tmp_path / 'ckpt.pt'}", f"--out={out}"],
                            capture_output=True, text=True)
    assert refuse.returncode != 0 and "--overwrite" in refuse.stderr


def test_llama_tokenizer_gives_sentencepiece_ids(tmp_path, small_tokenizer):
    import sentencepiece as spm

    from chatglm_tokenizer import SPTokenizer
    from export import PROBE_TEXTS, llama_tokenizer
    sp = spm.SentencePieceProcessor(model_file=small_tokenizer)
    tok = llama_tokenizer(SPTokenizer(small_tokenizer))
    texts = write_corpus(tmp_path / "c.txt", 300) + PROBE_TEXTS + ["  两个空格  ", "abc123def", "\u3000全角空格"]
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path / "saved")
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert [again.encode(t) for t in texts] == [sp.encode(t) for t in texts]


def test_chatglm_tokenizer_keeps_its_class(tmp_path, chatglm_path):
    from export import write_hf_tokenizer
    write_hf_tokenizer(chatglm_path, str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert tok.convert_tokens_to_ids("[gMASK]") == 64790 and tok.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False) == "你好<s>"


def test_gguf_file_reads_back(tmp_path, small_tokenizer):
    gguf = pytest.importorskip("gguf")
    from chatglm_tokenizer import load_tokenizer
    from export import export_gguf
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=600, max_seq_len=64, multiple_of=16)
    model = scrambled(args)
    export_gguf(model, small_tokenizer, str(tmp_path / "m.gguf"))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * 2
    assert list(tensors["token_embd.weight"].shape) == [32, 600]  # GGUF lists dimensions innermost first
    assert list(tensors["blk.1.attn_k.weight"].shape) == [32, 16]
    q = tensors["blk.0.attn_q.weight"].data.reshape(32, 32)
    assert torch.allclose(torch.from_numpy(q.copy()), model.state_dict()["layers.0.attention.wq.weight"])
    field = reader.fields["tokenizer.ggml.tokens"]
    tok = load_tokenizer(small_tokenizer)
    pieces = [bytes(field.parts[i]).decode() for i in field.data]
    assert pieces == [tok.id_to_piece(i) for i in range(600)]
    assert int(reader.fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert int(reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 2


def test_an_untied_output_matrix_is_its_own_gguf_tensor(tmp_path, small_tokenizer):
    gguf = pytest.importorskip("gguf")
    from export import export_gguf
    model = scrambled(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=64, multiple_of=16,
                                tie_embeddings=False))
    export_gguf(model, small_tokenizer, str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert len(tensors) == 3 + 9
    out = torch.from_numpy(tensors["output.weight"].data.reshape(600, 32).copy())
    assert torch.equal(out, model.output.weight.detach()) and not torch.equal(out, model.tok_embeddings.weight.detach())


@pytest.mark.parametrize("option", [{"qk_norm": True}, {"logit_softcap": 30.0}, {"value_embeddings": 1},
                                    {"feed_forward": "relu2"}, {"bigram_buckets": 50}, {"x0_scalars": True}])
def test_options_no_exported_architecture_computes_are_refused(tmp_path, small_tokenizer, option):
    from babyllama.errors import UsageError
    from export import export_gguf
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=64, multiple_of=16,
                                  **option))
    name = next(iter(option)) + ("=relu2" if "feed_forward" in option else "")
    with pytest.raises(UsageError, match=f"uses {name} "):
        export_hf(model, None, str(tmp_path / "hf"))
    with pytest.raises(UsageError, match=f"uses {name} "):
        export_gguf(model, small_tokenizer, str(tmp_path / "m.gguf"))
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


def test_llama_cpp_greedy_tokens_match(tmp_path, small_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (opt-in check)")
    from export import export_gguf
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=600, max_seq_len=128, multiple_of=16)
    model = scrambled(args)
    export_gguf(model, small_tokenizer, str(tmp_path / "m.gguf"))
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, verbose=False)
    prompt = [5, 17, 42, 99, 300]
    ours = model.generate([prompt], 16, eos_id=None)[0]
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == 16:
            break
    assert ours == theirs


def test_gguf_f16_and_q8_0_read_back_within_the_format_error(tmp_path, small_tokenizer):
    gguf = pytest.importorskip("gguf")
    from export import export_gguf, gguf_tensors
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=600, max_seq_len=64, multiple_of=32)
    model = scrambled(args)
    ours = {name: t.float().numpy() for name, t in gguf_tensors(model).items()}
    sizes = {}
    for kind in ("f32", "f16", "q8_0"):
        path = tmp_path / f"m-{kind}.gguf"
        export_gguf(model, small_tokenizer, str(path), kind)
        sizes[kind] = sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)
        for t in gguf.GGUFReader(str(path)).tensors:
            want = ours[t.name]
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            if want.ndim == 1:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32 and (got == want).all()
            elif kind == "f16":
                assert t.tensor_type == gguf.GGMLQuantizationType.F16
                assert abs(got - want).max() <= abs(want).max() * 2**-11
            elif kind == "q8_0":
                assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
                scale = abs(want).reshape(-1, 32).max(1, keepdims=True) / 127  # each block's, stored in float16:
                bound = scale * (0.5 + 127 * 2**-11)  # half a step, plus 127 steps of the scale's rounding
                assert (abs(got - want).reshape(-1, 32) <= bound + 1e-7).all(), t.name
    matrices = sum(w.size for w in ours.values() if w.ndim == 2)
    assert sizes["q8_0"] < 0.3 * sizes["f32"] and sizes["f16"] < 0.55 * sizes["f32"]
    assert sizes["q8_0"] >= matrices * 34 / 32  # 34 bytes a block of 32


def lora_run(tmp_path) -> tuple[Transformer, Transformer, dict]:
    """A ckpt.pt as sft.py --lora=true writes it (base weights and adapters apart), with adapters that are
    not zero; returns (the model with its adapters, the same merged, the LoRA settings)."""
    from babyllama.lora import apply_lora, merge_lora
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=600, max_seq_len=64, multiple_of=16)
    model = scrambled(args)
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq", "wk", "wv", "w2"]}
    apply_lora(model, **lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05)
    torch.save({"model": model.state_dict(), "model_args": asdict(args), "lora": lora}, tmp_path / "ckpt.pt")
    return model.eval(), merge_lora(copy.deepcopy(model)).eval(), lora


def test_a_lora_run_exports_as_a_peft_adapter_and_comes_back(tmp_path):
    peft = pytest.importorskip("peft")
    from babyllama.checkpoint import load_model
    from export import main
    model, merged, lora = lora_run(tmp_path)
    out = tmp_path / "hf_lora"
    main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--peft=true", "--tokenizer=", f"--out={out}"])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    adapted = peft.PeftModel.from_pretrained(base, str(out / "lora")).eval()
    x = torch.randint(3, 600, (2, 20))
    with torch.no_grad():
        ours = model(x)[0]
        assert (ours - merged(x)[0]).abs().max() < 1e-5
        assert (adapted(input_ids=x).logits - ours).abs().max() < 1e-5  # unmerged, under peft
        assert (adapted.merge_and_unload()(input_ids=x).logits - ours).abs().max() < 1e-5  # merged by peft
    main([f"--import_from={out}", f"--peft_adapter={out / 'lora'}", f"--out={tmp_path / 'back.pt'}"])
    back = torch.load(tmp_path / "back.pt", weights_only=False)
    assert back["lora"] == lora
    assert all(torch.equal(back["model"][k], v) for k, v in model.state_dict().items())
    reloaded, _ = load_model(str(tmp_path / "back.pt"))
    with torch.no_grad():
        assert (reloaded(x)[0] - ours).abs().max() < 1e-5


def test_what_peft_adapters_cannot_convert_is_one_line(tmp_path, capsys):
    from export import main

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit):
            main(list(argv))
        return capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of transformers

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=600, max_seq_len=64, multiple_of=16)
    torch.save({"model": scrambled(args).state_dict(), "model_args": asdict(args)}, tmp_path / "plain.pt")
    out = tmp_path / "hf"
    assert "has no LoRA adapters" in error(f"--ckpt={tmp_path / 'plain.pt'}", "--peft=true", "--tokenizer=",
                                           f"--out={out}")
    main([f"--ckpt={tmp_path / 'plain.pt'}", "--tokenizer=", f"--out={out}"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"], "bias": "none"}))
    said = error(f"--import_from={out}", f"--peft_adapter={adapter}", f"--out={tmp_path / 'back.pt'}")
    assert said == (f"error: --peft_adapter={adapter}: target_modules ['lm_head'] are not layers of ours "
                    "(q_proj, k_proj, v_proj, o_proj, gate_proj, down_proj, up_proj)")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"], "use_dora": True}))
    said = error(f"--import_from={out}", f"--peft_adapter={adapter}", f"--out={tmp_path / 'back.pt'}")
    assert said.endswith("only plain LoRA adapters convert (this one: LORA use_dora)")
    assert "give both" in error(f"--ckpt={tmp_path / 'plain.pt'}", f"--peft_adapter={adapter}",
                                f"--out={tmp_path / 'x'}")
