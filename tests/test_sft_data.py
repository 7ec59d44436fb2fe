import csv
import json

import pytest
import torch
from conftest import write_csv

from babyllama.chat_format import parse_answer
from chatglm_tokenizer import load_tokenizer
from dataset_sft import IGNORE_INDEX, SFTDataset, chat_prompt_ids, collate, encode_turns, make_example
from sft_data_process import Config, build


class CharTokenizer:
    """One id per character (ids 10 + ord % 1000), so expected ids can be written by hand."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [10 + ord(c) % 1000 for c in text]


def test_two_turn_loss_mask_by_hand():
    tok = CharTokenizer()
    ids, is_answer = encode_turns(tok, [("ab", "c"), ("d", "ef")], max_seq_len=64)
    a, b, c, d, e, f = (tok.encode(x)[0] for x in "abcdef")
    assert ids == [a, b, 1, c, 2, d, 1, e, f, 2]
    x, y = make_example(ids, is_answer)
    assert x.tolist() == [a, b, 1, c, 2, d, 1, e, f]
    # Labelled: the answer tokens and each answer's closing eos, predicted from the token before them.
    assert y.tolist() == [-100, -100, c, 2, -100, -100, e, f, 2]


def test_truncation_drops_oldest_turns_then_prompt_start_never_the_answer():
    tok = CharTokenizer()
    turns = [("一二三四五", "六七"), ("甲乙丙丁戊己庚", "子丑寅")]
    ids, is_answer = encode_turns(tok, turns, max_seq_len=12)
    assert len(ids) <= 13
    assert ids[-5:] == [1] + tok.encode("子丑寅") + [2]
    assert tok.encode("六七")[0] not in ids  # the older turn went first
    ids, _ = encode_turns(tok, [("很长的问题" * 10, "答案")], max_seq_len=8)
    assert ids[-4:] == [1] + tok.encode("答案") + [2] and len(ids) == 9
    assert ids[:5] == tok.encode("很长的问题")  # the prompt kept its end


def test_collate_pads_to_longest_and_padding_never_counts():
    examples = [make_example([5, 1, 6, 2], [False, False, True, True]), make_example([5, 5, 5, 1, 6, 7, 2],
                                                                                     [False] * 4 + [True] * 3)]
    x, y = collate(examples, pad_id=0)
    assert x.shape == y.shape == (2, 6)
    assert x[0].tolist() == [5, 1, 6, 0, 0, 0] and y[0].tolist() == [-100, 6, 2, -100, -100, -100]
    logits = torch.randn(2, 6, 10)
    full = torch.nn.functional.cross_entropy(logits.view(-1, 10), y.clamp(min=0).view(-1) % 10, reduction="none")
    manual = full[(y.view(-1) != IGNORE_INDEX)].mean()
    masked = torch.nn.functional.cross_entropy(logits.view(-1, 10), torch.where(y == -100, y, y % 10).view(-1),
                                               ignore_index=IGNORE_INDEX)
    assert torch.allclose(manual, masked)


def test_chat_prompt_matches_training_format():
    tok = CharTokenizer()
    ids = chat_prompt_ids(tok, [("ab", "c")], "d", max_seq_len=64)
    train_ids, _ = encode_turns(tok, [("ab", "c"), ("d", "x")], 64)
    assert ids == train_ids[:len(ids)] and ids[-1] == tok.bos_id


def test_sft_data_process_formats_counts_and_split(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "翻译", "input": "hello", "output": "你好"},
                                  {"instruction": "只有问题"},
                                  {"instruction": "翻译", "input": "hello", "output": "你好"}], ensure_ascii=False))
    huatuo = tmp_path / "huatuo.jsonl"
    huatuo.write_text(json.dumps({"data": ["问：头疼怎么办？", "答：多休息。", "问：还疼呢？", "答：去医院。"]},
                                 ensure_ascii=False) + "\n{bad json\n")
    disc = tmp_path / "disc.jsonl"
    disc.write_text(json.dumps({"conversation": [{"role": "user", "content": "问1"},
                                                 {"role": "assistant", "content": "答1"}]}, ensure_ascii=False) + "\n")
    chatmed = tmp_path / "chatmed.jsonl"
    chatmed.write_text(json.dumps({"query": "咳嗽", "response": "喝水"}, ensure_ascii=False) + "\n")
    cfg = Config(builtin="", inputs=f"alpaca:{alpaca},huatuo:{huatuo},disc:{disc},chatmed:{chatmed}",
                 out_dir=str(tmp_path / "out"), val_fraction=0.0, preference="")
    meta = build(cfg)
    assert meta["sources"]["alpaca:alpaca.json"] == {"read": 3, "kept": 1, "dropped_malformed": 1,
                                                     "dropped_duplicate": 1}
    assert meta["sources"]["huatuo:huatuo.jsonl"] == {"read": 2, "kept": 1, "dropped_malformed": 1}
    rows = list(csv.DictReader(open(tmp_path / "out" / "sft_data.csv", encoding="utf-8")))
    assert rows[0] == {"prompt": "翻译\nhello", "answer": "你好", "history": "[]"}
    # Cleaned as the pretraining text is: NFKC turns full-width ？ into ?.
    assert rows[1]["prompt"] == "还疼呢?" and json.loads(rows[1]["history"]) == [["头疼怎么办?", "多休息。"]]
    assert [r["answer"] for r in rows[2:]] == ["答1", "喝水"]
    with pytest.raises(Exception, match="--overwrite"):
        build(cfg)


def test_sft_dataset_on_real_tokenizer(tmp_path, small_tokenizer):
    path = tmp_path / "d.csv"
    write_csv(path, ["prompt", "answer", "history"],
              [["床前明月光", "疑是地上霜", json.dumps([["春眠", "不觉晓"]], ensure_ascii=False)]])
    tok = load_tokenizer(small_tokenizer)
    ds = SFTDataset(str(path), tok, 64)
    x, y = ds[0]
    answers = [tok.decode([t for t in y.tolist() if t != -100])]
    assert answers == ["不觉晓疑是地上霜"]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer,history\na,b,[oops\n")
    with pytest.raises(ValueError, match="bad.csv:2: 'history' is not a JSON list"):
        SFTDataset(str(bad), tok, 64)


def write_raw_idioms(raw):
    (raw / "idioms").mkdir(parents=True)
    chars = "画蛇添足守株待兔亡羊补牢对牛弹琴井底之蛙刻舟求剑掩耳盗铃杯弓蛇影"
    words = [chars[i:i + 4] for i in range(20)]
    idioms = [{"word": w, "explanation": f"{w}的意思是第{i}种"} for i, w in enumerate(words)]
    idioms.append({"word": "缺解释"})
    (raw / "idioms" / "idioms.json").write_text(json.dumps(idioms, ensure_ascii=False), encoding="utf-8")
    (raw / "sft_demo").mkdir()
    (raw / "sft_demo" / "dpo_zh_demo.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "你好"}], "chosen": {"from": "gpt", "value": "你好！"},
         "rejected": {"from": "gpt", "value": "滚"}}, {"conversations": []}], ensure_ascii=False), encoding="utf-8")


def test_preference_pairs_share_held_out_idioms(tmp_path):
    raw = tmp_path / "raw"
    write_raw_idioms(raw)
    cfg = Config(builtin="idioms", preference="idioms,dpo_demo", raw_dir=str(raw), out_dir=str(tmp_path / "out"),
                 val_fraction=0.4)
    meta = build(cfg)
    assert meta["preference"]["sources"]["idioms"] == {"read": 21, "kept": 20, "dropped_malformed": 1}
    assert meta["preference"]["sources"]["dpo_demo"] == {"read": 2, "kept": 1, "dropped_malformed": 1}
    pairs = list(csv.DictReader(open(tmp_path / "out" / "preference.csv", encoding="utf-8")))
    pairs += list(csv.DictReader(open(tmp_path / "out" / "preference_val.csv", encoding="utf-8")))
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        if p["prompt"].startswith("成语"):
            word = p["prompt"][3:7]
            assert p["chosen"].startswith(word) and not p["rejected"].startswith(word)
    sft_val = {r["prompt"] for r in csv.DictReader(open(tmp_path / "out" / "sft_val.csv", encoding="utf-8"))}
    pref_val = {r["prompt"] for r in csv.DictReader(open(tmp_path / "out" / "preference_val.csv", encoding="utf-8"))
                if r["prompt"].startswith("成语")}
    assert sft_val and sft_val == pref_val


def test_char_definition_takes_the_first_sense():
    from sft_data_process import char_definition
    assert char_definition("啀ái 1.犬斗貌。 2.吸饮。 3.借作挨。") == "犬斗貌。"
    assert char_definition("嗄〈叹〉\n\n 同啊”。表示省悟或惊奇\n\n 嗄!难道") == "同啊”。表示省悟或惊奇"
    assert char_definition("丫yā 1.") is None


def test_preference_sources_are_capped(tmp_path):
    raw = tmp_path / "raw"
    write_raw_idioms(raw)
    meta = build(Config(builtin="", preference="idioms", raw_dir=str(raw), out_dir=str(tmp_path / "out"),
                      max_pairs_per_source=5))
    assert meta["preference"]["sources"]["idioms"] == {"read": 21, "kept": 5, "dropped_malformed": 1,
                                                       "dropped_over_cap": 15}


def test_sharegpt_tool_calls_and_reasoning_take_our_chat_template(tmp_path):
    """LLaMA-Factory's two shapes as its demo sets hold them (glaive_toolcall_zh_demo: from/value with a
    function_call and an observation, tools as a JSON text; reason_tool_use_demo: typed content parts), in a
    file saved with a BOM and CRLF; each malformed record counted with what is wrong."""
    tools = json.dumps([{"name": "calculator", "description": "算", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}}}], ensure_ascii=False)
    glaive = {"conversations": [
        {"from": "human", "value": "3乘4?"},
        {"from": "function_call", "value": '{"name": "calculator", "arguments": {"expression": "3*4"}}'},
        {"from": "observation", "value": "12"}, {"from": "gpt", "value": "是12。"}], "tools": tools}
    parts = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "你是助手。"}]},
        {"role": "user", "content": [{"type": "text", "value": "5加6?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "加法。"}, {"type": "tool_call", "value": (
            '{"name": "calculator", "arguments": {"expression": "5+6"}}')}]},
        {"role": "tool", "content": [{"type": "text", "value": "11"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "得11。"},
                                          {"type": "text", "value": "11。"}]}],
        "tools": json.loads(tools)}
    bad = [{"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{not json"},
                              {"from": "observation", "value": "1"}, {"from": "gpt", "value": "y"}]},
           {"conversations": [{"from": "robot", "value": "x"}]},
           {"conversations": [{"from": "human", "value": "x"}]},
           {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tools": "[oops"},
           {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                              {"from": "observation", "value": "1"}, {"from": "gpt", "value": "z"}]}]
    path = tmp_path / "tools.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False)
                                                    for r in [glaive, parts, *bad]).encode("utf-8") + b"\r\n")
    meta = build(Config(builtin="", inputs=f"sharegpt:{path}", out_dir=str(tmp_path / "out"), val_fraction=0.0,
                        preference=""))
    assert meta["sources"]["sharegpt:tools.jsonl"] == {"read": 7, "kept": 2, "dropped_malformed": 5}
    errors = " | ".join(meta["malformed_examples"])
    for expected in ("a tool call that is not JSON", "unknown role 'robot'", "the last message is not the assistant's",
                     "'tools' is not JSON", "a tool message must follow an assistant message with tool_calls"):
        assert expected in errors
    rows = list(csv.DictReader(open(tmp_path / "out" / "sft_data.csv", encoding="utf-8")))
    assert json.loads(rows[0]["history"]) == [[
        "<tools>calculator(expression): 算</tools>3乘4?",
        '<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call>']]
    assert rows[0]["prompt"] == "<tool_response>12</tool_response>" and rows[0]["answer"] == "是12。"
    assert json.loads(rows[1]["history"]) == [[
        "<tools>calculator(expression): 算</tools>你是助手。\n5加6?",
        '<think>加法。</think><tool_call>{"name": "calculator", "arguments": {"expression": "5+6"}}</tool_call>']]
    assert rows[1]["answer"] == "<think>得11。</think>11。"


def test_look_up_tasks_join_the_mix_only_when_asked(tmp_path, lookup_tables):
    def look_ups(**flags) -> tuple[bool, bool]:
        """(whether a turn calls a look-up, whether a prompt offers one)."""
        out = tmp_path / str(len(flags))
        build(Config(builtin="tools", tool_samples=300, raw_dir=lookup_tables, out_dir=str(out), preference="",
                     **flags))
        turns = [turn for r in csv.DictReader(open(out / "sft_data.csv", encoding="utf-8"))
                 for turn in json.loads(r["history"]) + [[r["prompt"], r["answer"]]]]
        called = any(call.name in ("idiom_meaning", "char_reading") for _, answer in turns
                     for call in parse_answer(answer).tool_calls)
        return called, any("idiom_meaning(idiom)" in prompt for prompt, _ in turns)
    assert look_ups() == (False, False)
    assert look_ups(tool_lookups=True) == (True, True)


def test_batches_grouped_by_length_are_mostly_answer_not_padding(tmp_path):
    """Samples of 2 to 200 characters (one in three long, like the tool tasks among idioms): batches of
    16 in the grouped order hold far less padding than in a random order, and every sample still comes."""
    from dataset import WindowOrder
    rows = [["问" * (100 if i % 3 == 0 else 1 + i % 7), "答" * (1 + i % 5), "[]"] for i in range(512)]
    write_csv(tmp_path / "sft.csv", ["prompt", "answer", "history"], rows)
    data = SFTDataset(str(tmp_path / "sft.csv"), CharTokenizer(), max_seq_len=256)
    assert data.lengths()[:2] == [101, 4]

    def padding_share(order):
        padded = real = 0
        for _ in range(len(data) // 16):
            x, _ = data.batch(order.next(16))
            padded, real = padded + x.numel(), real + int((x != 0).sum())
        return 1 - real / padded

    grouped = WindowOrder(len(data), seed=0, lengths=data.lengths(), group=16)
    assert padding_share(grouped) < 0.1 < 0.5 < padding_share(WindowOrder(len(data), seed=0))
