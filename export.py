"""Export a checkpoint to a Hugging Face folder that `transformers` loads with no custom model code,
and import such a folder back into our checkpoint format.

    python export.py --ckpt=out/sft/ckpt.pt --out=out/hf_sft           # -> LlamaForCausalLM folder
    python export.py --ckpt=Llama2-Chinese-92M.pth --preset=baby_92m \
        --tokenizer=chatglm_tokenizer/tokenizer.model --out=out/hf_92m     # the seed's released weights
    python export.py --import_from=out/hf_sft --out=out/imported/ckpt.pt  # back to ckpt.pt
    python export.py --ckpt=out/sft/ckpt.pt --gguf=true --out=out/sft.gguf  # llama.cpp / Ollama
    python export.py --ckpt=out/lora/ckpt.pt --peft=true --out=out/hf_lora  # base + PEFT adapter in lora/
    python export.py --import_from=out/hf_lora --peft_adapter=out/hf_lora/lora --out=out/back/ckpt.pt

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/hf_sft")
    tok = AutoTokenizer.from_pretrained("out/hf_sft")  # the ChatGLM2 file: add trust_remote_code=True

A LoRA run (sft.py --lora=true) exports merged by default; with --peft=true the folder holds the base
model and lora/ a PEFT adapter (`PeftModel.from_pretrained(base, "out/hf_lora/lora")`), and
--peft_adapter reads such an adapter (ours or one trained with peft on our exported base) back into a
LoRA ckpt.pt.

The model is a plain `LlamaForCausalLM` (safetensors, tied embeddings); a mixture of experts is a
`MixtralForCausalLM` or a `Qwen2MoeForCausalLM` (hf_architecture, docs/12_moe.md). Our RoPE rotates adjacent
pairs (2i, 2i+1) while transformers rotates halves (i, i + d/2), so the rows of wq and wk are permuted
within each head on the way out and back on the way in. A tokenizer we trained becomes a standard
`LlamaTokenizer` (byte-fallback BPE in tokenizer.json, same ids as SentencePiece); the ChatGLM2 file keeps
our tokenizer class, loaded with `trust_remote_code`. Both carry the SFT chat template.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass

import torch

from babyllama.chat_format import MARKERS
from babyllama.checkpoint import clean_state_dict, load_model, read_checkpoint, save_atomic
from babyllama.common import require
from babyllama.configurator import OutputPath, one_of, parse_config, read_model_preset
from babyllama.errors import UsageError, one_line_errors
from chatglm_tokenizer import HERE as TOKENIZER_CODE
from chatglm_tokenizer import SPTokenizer, load_tokenizer, resolve_tokenizer_path
from model import YARN_BETA_FAST, YARN_BETA_SLOW, ModelArgs, Transformer

# chat_format.py's template in Jinja (tests check they agree): tools and system text before the first user
# message, <s> (bos) after each prompt, </s> (eos) after each answer; enable_thinking as chat_format's reasoning
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prefix='', first=true) -%}"
    "{%- if tools %}{% set ns.prefix = '<tools>' %}{% for t in tools %}"
    "{% set f = t.function if t.function is defined else t %}"
    "{% set p = f.parameters.properties if f.parameters is defined and f.parameters.properties is defined else {} %}"
    "{% set ns.prefix = ns.prefix + f.name + '(' + (p | list | join(', ')) + ')'"
    " + (': ' + f.description if f.description is defined and f.description else '')"
    " + ('' if loop.last else '\\n') %}{% endfor %}{% set ns.prefix = ns.prefix + '</tools>' %}{% endif -%}"
    "{%- for m in messages if m.role == 'system' %}{% set ns.prefix = ns.prefix + m.content + '\\n' %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{ ns.prefix if ns.first else '' }}{% set ns.first = false %}{{ m.content }}<s>"
    "{%- elif m.role == 'tool' -%}<tool_response>{{ m.content }}</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<s>{% endif %}"
    "{%- elif m.role == 'assistant' -%}"
    "{% if m.reasoning_content is string %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": {{ c.function.name | tojson }}, \"arguments\": "
    "{{ c.function.arguments if c.function.arguments is string else c.function.arguments | tojson }}}"
    "</tool_call>{% endfor %}</s>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if enable_thinking is defined and messages[-1].role != 'assistant' -%}"
    "{{ '<think>' if enable_thinking else '<think></think>' }}{%- endif -%}")


@dataclass
class Config:
    ckpt: str = "out/sft/ckpt.pt"  # our ckpt.pt, or a raw state_dict .pth (then give --preset)
    preset: str = ""  # the model shape of a raw .pth (e.g. baby_92m); empty for our ckpt.pt
    tokenizer: str = "data/tokenizer/tokenizer.model"  # copied into the folder
    out: OutputPath = "out/hf"  # the folder to write (export), or the ckpt.pt to write (import)
    import_from: str = ""  # a Hugging Face folder (llama, mixtral, qwen2_moe) to convert back into our format
    gguf: bool = False  # write a GGUF file (llama.cpp, Ollama) at --out instead of a folder
    gguf_type: one_of("f32", "f16", "q8_0") = "f32"  # the GGUF's matrices: float32, float16 or 8-bit blocks
    peft: bool = False  # a LoRA run: the base model, and its adapters as a PEFT adapter in out/lora
    peft_adapter: str = ""  # with --import_from: a PEFT LoRA adapter folder for that model, kept as adapters
    overwrite: bool = False


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows (2i, 2i+1) of each head -> rows (i, i + d/2): adjacent-pair RoPE to rotate_half RoPE."""
    rows, dim = w.shape
    d = rows // n_heads
    return w.view(n_heads, d // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, dim = w.shape
    d = rows // n_heads
    return w.view(n_heads, 2, d // 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_architecture(args: ModelArgs) -> str:
    """The transformers model type that computes what ours does: llama for a dense model; for a mixture of
    experts mixtral (softmax router, top-k renormalised) when it has no shared experts and k > 1, else
    qwen2_moe (its top-k weights renormalised or not; its shared expert behind a sigmoid gate that is set
    to a constant, or zero when we have none)."""
    if not args.n_experts:
        return "llama"
    return "mixtral" if not args.n_shared_experts and args.n_active_experts > 1 else "qwen2_moe"


def without_equal(args: ModelArgs) -> None:
    """UsageError when the model uses a speedrun option that neither transformers' architectures here nor
    llama.cpp's llama compute: an export would give other logits."""
    used = [name for name in ("qk_norm", "logit_softcap", "value_embeddings", "bigram_buckets", "x0_scalars")
            if getattr(args, name)]
    used += ["feed_forward=relu2"] if args.feed_forward == "relu2" else []
    if used:
        raise UsageError(f"this model uses {', '.join(used)} (ModelArgs), which the exported architectures (llama, "
                         "mixtral, qwen2_moe) do not compute; it cannot be exported with equal logits")


def hf_config(args: ModelArgs):
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig
    common = dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                  num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                  num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.max_seq_len,
                  rms_norm_eps=args.norm_eps, rope_theta=args.rope_base,  # ntk: the larger base it is
                  rope_scaling=hf_rope_scaling(args), tie_word_embeddings=args.tie_embeddings,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kind = hf_architecture(args)
    if kind == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    if kind == "mixtral":
        return MixtralConfig(**common, num_local_experts=args.n_experts, num_experts_per_tok=args.n_active_experts)
    return Qwen2MoeConfig(**common, moe_intermediate_size=args.hidden_dim, num_experts=args.n_experts,
                          num_experts_per_tok=args.n_active_experts, norm_topk_prob=args.n_active_experts > 1,
                          shared_expert_intermediate_size=max(1, args.n_shared_experts * args.hidden_dim),
                          qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[])


def hf_rope_scaling(args: ModelArgs) -> dict | None:
    if args.rope_scaling not in ("linear", "yarn"):
        return None
    extra = {"original_max_position_embeddings": args.rope_original_len} if args.rope_scaling == "yarn" else {}
    return {"rope_type": args.rope_scaling, "factor": args.rope_factor, **extra}


def rope_from_hf(config, folder: str) -> dict:
    """Our rope settings from a transformers config (rope_parameters, or rope_scaling before v5)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params |= dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {"rope_theta": theta}
    tuned = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if params.get(k) is not None]
    tuned += [k for k, v in (("beta_fast", YARN_BETA_FAST), ("beta_slow", YARN_BETA_SLOW)) if params.get(k, v) != v]
    if kind not in ("linear", "yarn") or tuned or params.get("truncate") is False:
        raise ValueError(f"{folder}: RoPE scaling {kind} {tuned or ''} has no equal here (linear, yarn with its "
                         "default betas, or a larger rope_theta for ntk)")
    original = params.get("original_max_position_embeddings") or config.max_position_embeddings
    return {"rope_theta": theta, "rope_scaling": kind, "rope_factor": float(params["factor"]),
            "rope_original_len": int(original)}


# Our per-layer names -> transformers' (under model.layers.{i}.); q and k are also permuted (see above).
HF_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                  "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}
DENSE_ONLY = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")  # a mixture of experts maps its own


def _heads(name: str, args: ModelArgs) -> int | None:
    """How many heads a matrix's rows are permuted in: wq and wk only."""
    return {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(name)


def _layer_names(args: ModelArgs) -> dict[str, str]:
    return {k: v for k, v in HF_LAYER_NAMES.items() if not (args.n_experts and k in DENSE_ONLY)}


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    a, sd = model.args, model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(a.n_layers):
        for ours, theirs in _layer_names(a).items():
            w = sd[f"layers.{i}.{ours}.weight"]
            heads = _heads(ours, a)
            out[f"model.layers.{i}.{theirs}.weight"] = permute_to_hf(w, heads) if heads else w
        if a.n_experts:
            out.update(experts_to_hf(sd, i, a))
    return out


def experts_to_hf(sd: dict[str, torch.Tensor], i: int, a: ModelArgs) -> dict[str, torch.Tensor]:
    """A block's router and experts as transformers (5 and later) holds them: each expert's w1 and w3
    stacked as gate_up_proj (experts, 2 x hidden, dim), its w2 as down_proj; qwen2_moe's shared expert
    (ours, or zero when we have none) with its gate at zero, so a constant sigmoid(0) = 1/2 that the
    doubled down projection undoes exactly."""
    ours, theirs = f"layers.{i}.feed_forward", f"model.layers.{i}.mlp"
    experts = [f"{ours}.experts.{e}" for e in range(a.n_experts)]
    out = {f"{theirs}.gate.weight": sd[f"{ours}.router.weight"],
           f"{theirs}.experts.gate_up_proj": torch.stack([torch.cat([sd[f"{e}.w1.weight"], sd[f"{e}.w3.weight"]])
                                                          for e in experts]),
           f"{theirs}.experts.down_proj": torch.stack([sd[f"{e}.w2.weight"] for e in experts])}
    if hf_architecture(a) == "qwen2_moe":
        if a.n_shared_experts:
            shared = {name: sd[f"{ours}.shared.{w}.weight"]
                      for w, name in (("w1", "gate"), ("w3", "up"), ("w2", "down"))}
        else:
            shared = {"gate": torch.zeros(1, a.dim), "up": torch.zeros(1, a.dim), "down": torch.zeros(a.dim, 1)}
        out |= {f"{theirs}.shared_expert.{name}_proj.weight": w * 2 if name == "down" else w
                for name, w in shared.items()}
        out[f"{theirs}.shared_expert_gate.weight"] = torch.zeros(1, a.dim)
    return out


def experts_from_hf(sd: dict[str, torch.Tensor], i: int, a: ModelArgs, folder: str) -> dict[str, torch.Tensor]:
    """experts_to_hf backwards; a qwen2_moe shared-expert gate that is not zero (a constant) has no equal here."""
    ours, theirs = f"layers.{i}.feed_forward", f"model.layers.{i}.mlp"
    gate_up, down = sd[f"{theirs}.experts.gate_up_proj"], sd[f"{theirs}.experts.down_proj"]
    out = {f"{ours}.router.weight": sd[f"{theirs}.gate.weight"]}
    for e in range(a.n_experts):
        out[f"{ours}.experts.{e}.w1.weight"], out[f"{ours}.experts.{e}.w3.weight"] = gate_up[e].chunk(2)
        out[f"{ours}.experts.{e}.w2.weight"] = down[e]
    if f"{theirs}.shared_expert_gate.weight" in sd:
        shared = {w: sd[f"{theirs}.shared_expert.{name}_proj.weight"] for w, name in (("w1", "gate"), ("w3", "up"),
                                                                                        ("w2", "down"))}
        if sd[f"{theirs}.shared_expert_gate.weight"].any() or not a.n_shared_experts and shared["w2"].any():
            raise UsageError(f"--import_from={folder}: layer {i}'s shared expert has a learned gate or a width of 1; "
                             "only a constant gate (zero weights, as export.py writes) has an equal here")
        if a.n_shared_experts:
            out |= {f"{ours}.shared.{w}.weight": weight / 2 if w == "w2" else weight for w, weight in shared.items()}
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs, folder: str = "") -> dict[str, torch.Tensor]:
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    out["output.weight"] = sd.get("lm_head.weight", out["tok_embeddings.weight"])
    for i in range(args.n_layers):
        for ours, theirs in _layer_names(args).items():
            w = sd[f"model.layers.{i}.{theirs}.weight"]
            heads = _heads(ours, args)
            out[f"layers.{i}.{ours}.weight"] = permute_from_hf(w, heads) if heads else w
        if args.n_experts:
            out.update(experts_from_hf(sd, i, args, folder))
    return out


def export_hf(model: Transformer, tokenizer_path: str | None, out: str) -> None:
    """Write out/ as a transformers folder: config, model.safetensors, generation config, tokenizer."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    without_equal(model.args)
    hf = AutoModelForCausalLM.from_config(hf_config(model.args))
    try:
        hf.load_state_dict(to_hf_state_dict(model), strict=True)
    except RuntimeError as e:
        if not model.args.n_experts:
            raise
        import transformers
        raise UsageError(f"transformers {transformers.__version__} keeps a mixture of experts' weights another way: "
                         "the export needs transformers 5 or later (experts stacked in 3-d tensors)") from e
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if tokenizer_path:  # first: a file that is not a tokenizer is named before the weights are written
            write_hf_tokenizer(resolve_tokenizer_path(tokenizer_path), tmp)
        hf.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def write_hf_tokenizer(model_file: str, folder: str) -> None:
    """Our SentencePiece BPE models become a standard `LlamaTokenizer` (tokenizer.json, no custom code);
    the ChatGLM2 file, whose five special ids live outside its SentencePiece model, keeps our class."""
    sp_tok = load_tokenizer(model_file)
    if sp_tok.special_tokens:
        write_chatglm_tokenizer(model_file, folder)
        return
    tok = llama_tokenizer(sp_tok)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)


def llama_tokenizer(sp_tok: SPTokenizer):
    """A `tokenizers` BPE with byte fallback holding the SentencePiece pieces. SentencePiece merges the
    pair whose result has the best score (our ids are in score order), so merges are ranked by the id of
    the merged piece. Checked on probe texts: a model this cannot mirror (e.g. one that normalises
    its input) is refused rather than exported with different ids."""
    from transformers import AddedToken, LlamaTokenizer
    sp = sp_tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp_tok.n_pieces)}
    ranked = []
    for i, piece in enumerate(vocab):
        if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i):
            continue
        ranked += [(i, vocab[piece[:k]], piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]
    merges = [(a, b) for *_, a, b in sorted(ranked)]
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp_tok.unk_id),
                         bos_token=sp.id_to_piece(sp_tok.bos_id), eos_token=sp.id_to_piece(sp_tok.eos_id),
                         pad_token=sp.id_to_piece(sp_tok.pad_id), add_prefix_space=dummy_prefix,
                         add_bos_token=False, add_eos_token=False)  # our models are trained on plain ids
    # the chat template's markers are whole pieces wherever they occur
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKERS if m in vocab])
    for text in PROBE_TEXTS:
        if tok.encode(text) != sp_tok.encode(text):
            raise ValueError(f"{sp_tok.model_file} cannot be mirrored by a Llama tokenizer (it encodes "
                             f"{text!r} differently); export the model without --tokenizer")
    return tok


PROBE_TEXTS = ["中华人民共和国成立于1949年。", '<think>想</think>a<tool_call>{"name": "x"}</tool_call>',
               "Hello,  world!\t1 2 3", " 前导空格 and trailing ", "emoji 😀 生僻字 𠀀",
               "第一行\n第二行\n\n", "ＡＢＣ全角，标点？"]


def write_chatglm_tokenizer(model_file: str, folder: str) -> None:
    for name in ("tokenization_chatglm.py", "sp_tokenizer.py"):
        shutil.copy(os.path.join(TOKENIZER_CODE, name), folder)
    shutil.copy(model_file, os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(TOKENIZER_CODE, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)


GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def export_gguf(model: Transformer, tokenizer_path: str, out: str, kind: str = "f32") -> None:
    """A GGUF file for llama.cpp, tokenizer inside; its matrices in kind (f32, f16, or q8_0: blocks of
    32 int8 values with a float16 scale, by the gguf package's quantizer); norms stay float32, as
    llama.cpp's converter keeps them. llama.cpp's Llama RoPE rotates adjacent pairs, as ours does, so
    wq and wk go in unpermuted; a tied output matrix is not repeated, an untied one is output.weight."""
    import gguf

    a, tok = model.args, load_tokenizer(tokenizer_path)
    without_equal(a)
    if a.n_experts and hf_architecture(a) != "mixtral":
        raise UsageError("llama.cpp's Llama architecture routes like Mixtral only (no shared experts, several experts "
                         "a token, their weights renormalised): this mixture of experts has no GGUF equal; export it "
                         "for transformers (without --gguf)")
    writer = gguf.GGUFWriter(out + ".tmp", "llama")
    writer.add_name("baby-llama2-chinese")
    writer.add_context_length(a.max_seq_len)
    writer.add_embedding_length(a.dim)
    writer.add_block_count(a.n_layers)
    writer.add_feed_forward_length(a.hidden_dim)
    writer.add_head_count(a.n_heads)
    writer.add_head_count_kv(a.n_kv_heads)
    if a.n_experts:
        writer.add_expert_count(a.n_experts)
        writer.add_expert_used_count(a.n_active_experts)
    writer.add_layer_norm_rms_eps(a.norm_eps)
    writer.add_rope_freq_base(a.rope_base)
    if a.rope_scaling in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(a.rope_scaling))
        writer.add_rope_scaling_factor(a.rope_factor)
        writer.add_rope_scaling_orig_ctx_len(a.rope_original_len)
    writer.add_rope_dimension_count(a.dim // a.n_heads)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    tokens, scores, types = [], [], []
    for i in range(a.vocab_size):  # the model's rows; ids past the tokenizer's (the seed's 64793) are padding
        piece = tok.id_to_piece(i) if i < tok.vocab_size else f"[PAD{i}]"
        tokens.append(piece.encode("utf-8"))
        scores.append(tok.sp.get_score(i) if i < tok.n_pieces else 0.0)
        if i < tok.n_pieces and tok.sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif i < tok.n_pieces and tok.sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif i >= tok.n_pieces or tok.sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif piece in MARKERS:  # the chat template's markers: one piece wherever they occur
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(tok.unk_id)
    writer.add_add_bos_token(False)  # our models are trained on plain ids
    writer.add_add_space_prefix(tok.sp.encode("a", out_type=str)[0].startswith("\u2581"))  # ChatGLM2: yes
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in gguf_tensors(model).items():
        add_gguf_tensor(writer, name, tensor.float().numpy(), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(out + ".tmp", out)


def add_gguf_tensor(writer, name: str, data, kind: str) -> None:
    """A matrix in kind (q8_0 needs rows of whole 32-value blocks: others go in float16); vectors float32."""
    import gguf
    import numpy as np
    if data.ndim < 2 or kind == "f32":
        writer.add_tensor(name, data)
    elif kind == "q8_0" and data.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names; a mixture of experts' router as ffn_gate_inp and its experts'
    matrices stacked, one 3-d tensor per kind (ffn_gate_exps, ffn_up_exps, ffn_down_exps), as Mixtral's."""
    a, sd = model.args, model.state_dict()
    out = {"token_embd.weight": sd["tok_embeddings.weight"], "output_norm.weight": sd["norm.weight"]}
    if not a.tie_embeddings:
        out["output.weight"] = sd["output.weight"]
    for i in range(a.n_layers):
        for ours, theirs in GGUF_NAMES.items():
            if not (a.n_experts and ours in DENSE_ONLY):
                out[f"blk.{i}.{theirs}.weight"] = sd[f"layers.{i}.{ours}.weight"]
        if a.n_experts:
            ours = f"layers.{i}.feed_forward"
            out[f"blk.{i}.ffn_gate_inp.weight"] = sd[f"{ours}.router.weight"]
            for w, name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                out[f"blk.{i}.{name}.weight"] = torch.stack([sd[f"{ours}.experts.{e}.{w}.weight"]
                                                             for e in range(a.n_experts)])
    return out


# Our linear layers' short names (sft.py --lora_targets) -> PEFT's target_modules.
PEFT_TARGETS = {ours.split(".")[1]: theirs.split(".")[1] for ours, theirs in HF_LAYER_NAMES.items() if "." in ours}


def peft_tensors(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our adapters (lora_a, lora_b of each wrapped layer) under PEFT's names; lora_b's rows of wq and
    wk permuted like the weights they add to."""
    out = {}
    for i in range(args.n_layers):
        for ours, theirs in HF_LAYER_NAMES.items():
            a, b = state.get(f"layers.{i}.{ours}.lora_a"), state.get(f"layers.{i}.{ours}.lora_b")
            if a is None:
                continue
            heads = _heads(ours, args)
            name = f"base_model.model.model.layers.{i}.{theirs}"
            out[f"{name}.lora_A.weight"] = a.contiguous()
            out[f"{name}.lora_B.weight"] = (permute_to_hf(b, heads) if heads else b).contiguous()
    return out


def export_peft(ckpt_path: str, tokenizer_path: str | None, out: str) -> None:
    """A LoRA run's ckpt.pt as out/ (the base model, a transformers folder) and out/lora (its adapters, a
    PEFT adapter: adapter_config.json and adapter_model.safetensors)."""
    from safetensors.torch import save_file

    from babyllama.lora import apply_lora, base_of
    peft = require("peft", "--peft=true")
    ckpt = read_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or not ckpt.get("lora"):
        raise UsageError(f"--ckpt={ckpt_path} has no LoRA adapters (a run of sft.py --lora=true has); "
                         "export it without --peft")
    lora, args = ckpt["lora"], ModelArgs(**ckpt["model_args"])
    if args.n_experts and set(lora["targets"]) & {"w1", "w2", "w3"}:
        raise UsageError(f"--ckpt={ckpt_path} has LoRA adapters on a mixture of experts' feed-forward, which PEFT "
                         "cannot hold for transformers' stacked experts; export it merged (without --peft)")
    model = Transformer(args)
    apply_lora(model, **lora)
    state = clean_state_dict(ckpt["model"])
    model.load_state_dict(state, strict=True)
    export_hf(base_of(model), tokenizer_path, out)
    folder = os.path.join(out, "lora")
    config = peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                             target_modules=[PEFT_TARGETS[t] for t in lora["targets"]], bias="none",
                             task_type="CAUSAL_LM", base_model_name_or_path=os.path.abspath(out))
    config.save_pretrained(folder)
    save_file(peft_tensors(state, args), os.path.join(folder, "adapter_model.safetensors"))


def import_peft(folder: str, model: Transformer) -> dict:
    """Wrap model's layers with the LoRA adapters of a PEFT adapter folder and load them; returns our
    LoRA settings (rank, alpha, dropout, targets). Refuses what our LoRA does not compute."""
    from safetensors.torch import load_file

    from babyllama.lora import apply_lora
    config_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"--peft_adapter={folder}: no adapter_config.json there; a PEFT adapter folder is expected")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    unsupported = [key for key in ("use_rslora", "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern")
                   if config.get(key)] + ([f"bias={config['bias']}"] if config.get("bias", "none") != "none" else [])
    if config.get("peft_type") != "LORA" or unsupported:
        raise UsageError(f"--peft_adapter={folder}: only plain LoRA adapters convert (this one: "
                         f"{config.get('peft_type')} {' '.join(unsupported)})")
    theirs = set(config["target_modules"])
    targets = [ours for ours, name in PEFT_TARGETS.items() if name in theirs]
    if len(targets) != len(theirs):
        raise UsageError(f"--peft_adapter={folder}: target_modules {sorted(theirs - set(PEFT_TARGETS.values()))} "
                         f"are not layers of ours ({', '.join(PEFT_TARGETS.values())})")
    lora = {"rank": config["r"], "alpha": config["lora_alpha"], "dropout": config.get("lora_dropout", 0.0),
            "targets": targets}
    apply_lora(model, **lora)
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    expected = peft_tensors(model.state_dict(), model.args)
    if set(tensors) != set(expected):
        raise UsageError(f"--peft_adapter={folder}: its tensors do not fit this model (for example "
                         f"{sorted(set(tensors) ^ set(expected))[0]})")
    state = model.state_dict()
    for i in range(model.args.n_layers):
        for ours, name in HF_LAYER_NAMES.items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            if f"{prefix}.lora_A.weight" in tensors:
                heads = _heads(ours, model.args)
                b = tensors[f"{prefix}.lora_B.weight"]
                state[f"layers.{i}.{ours}.lora_a"] = tensors[f"{prefix}.lora_A.weight"]
                state[f"layers.{i}.{ours}.lora_b"] = permute_from_hf(b, heads) if heads else b
    model.load_state_dict(state, strict=True)
    return lora


def feed_forward_from_hf(config, folder: str) -> dict:
    """Our feed-forward settings from a llama, mixtral or qwen2_moe config; what ours cannot compute is refused."""
    kind = config.model_type
    if kind == "llama":
        return {"hidden_dim": config.intermediate_size}
    if kind == "mixtral":
        return {"hidden_dim": config.intermediate_size, "n_experts": config.num_local_experts,
                "n_active_experts": config.num_experts_per_tok}
    if kind != "qwen2_moe":
        raise ValueError(f"{folder} holds a {kind} model; only llama, mixtral and qwen2_moe folders convert")
    k, hidden, shared = config.num_experts_per_tok, config.moe_intermediate_size, config.shared_expert_intermediate_size
    checks = (("qkv_bias", not config.qkv_bias), ("decoder_sparse_step", config.decoder_sparse_step == 1),
              ("mlp_only_layers", not config.mlp_only_layers), ("norm_topk_prob", config.norm_topk_prob == (k > 1)),
              ("shared_expert_intermediate_size", shared == 1 or shared % hidden == 0))
    differs = [name for name, ok in checks if not ok]
    if differs:
        raise ValueError(f"{folder}: a qwen2_moe model whose {', '.join(differs)} has no equal here")
    return {"hidden_dim": hidden, "n_experts": config.num_experts, "n_active_experts": k,
            "n_shared_experts": 0 if shared == 1 else shared // hidden}


def import_hf(folder: str) -> Transformer:
    """Our model from a transformers llama, mixtral or qwen2_moe folder, its embeddings tied or not."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(f"--import_from={folder}: no config.json there; a Hugging Face model folder is expected "
                         "(one written by export.py or save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except OSError as e:
        raise UsageError(f"--import_from={folder}: {str(e).splitlines()[0]}") from None
    args = ModelArgs(dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
                     n_kv_heads=config.num_key_value_heads, vocab_size=config.vocab_size,
                     norm_eps=config.rms_norm_eps, max_seq_len=config.max_position_embeddings,
                     tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
                     **feed_forward_from_hf(config, folder), **rope_from_hf(config, folder))
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except OSError as e:  # config.json without the weights
        raise UsageError(f"--import_from={folder}: {str(e).splitlines()[0]}") from None
    model = Transformer(args)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), args, folder), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        if os.path.exists(cfg.out) and not cfg.overwrite:
            raise UsageError(f"{cfg.out} exists; pass --overwrite=true to replace it")
        if cfg.import_from:
            model = import_hf(cfg.import_from)
            lora = import_peft(cfg.peft_adapter, model) if cfg.peft_adapter else None
            os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
            state = {"model": model.state_dict(), "model_args": asdict(model.args), "stage": "imported",
                     **({"lora": lora} if lora else {})}
            save_atomic(state, cfg.out)
            print(f"wrote {cfg.out} ({model.num_params() / 1e6:.2f}M parameters"
                  + (f", LoRA adapters of rank {lora['rank']} on {','.join(lora['targets'])})" if lora else ")"))
            return
        if cfg.peft_adapter:
            raise UsageError("--peft_adapter reads an adapter for the model of --import_from; give both")
        if cfg.peft:
            export_peft(cfg.ckpt, cfg.tokenizer or None, cfg.out)
            print(f"wrote {cfg.out} (the base model) and {os.path.join(cfg.out, 'lora')} (a PEFT adapter): "
                  f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({cfg.out!r}), "
                  f"{os.path.join(cfg.out, 'lora')!r})")
            return
        args = read_model_preset(cfg.preset) if cfg.preset else None
        model, _ = load_model(cfg.ckpt, model_args=args)
        if cfg.gguf:
            export_gguf(model, cfg.tokenizer, cfg.out, cfg.gguf_type)
            print(f"wrote {cfg.out}: run it with llama.cpp, e.g. llama-cli -m {cfg.out}")
            return
        export_hf(model, cfg.tokenizer or None, cfg.out)
    print(f"wrote {cfg.out}: load it with transformers.AutoModelForCausalLM.from_pretrained({cfg.out!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
