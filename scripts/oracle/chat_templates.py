"""Oracle for core/tests/chat_templates.rs: renders and tokenises conversations with transformers.

Usage: chat_templates.py INPUT.json OUTPUT.json

INPUT = {
  "out_dir": dir for converted tokenizers,
  "tokenizers": {name: model dir},        # each saved as out_dir/name/tokenizer.json
  "cases": [{name, template_dir, template (str or null), tokenizer (name or null),
             turns (lmms-ft Conversation turns), images [int], videos [int],
             image_token, video_token}]
}
OUTPUT = {"tokenizers": {name: path},
          "cases": {name: {rendered, prompt_rendered, ids?, labels?, labels_all?, prompt_ids?}
                         or {error}}}

Labels are computed here independently of the Rust code: assistant contents are found by
searching each text in order in the rendered string (no sentinels), and tokens are chosen with
the Python tokenizer's character offset mapping, applying the label rule of
core/src/data/template.rs as written.
"""

import json
import os
import sys

import transformers
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template


def discover(dir_):
    """transformers' precedence: chat_template.jinja, chat_template.json, tokenizer_config."""
    p = os.path.join(dir_, "chat_template.jinja")
    if os.path.isfile(p):
        return open(p, encoding="utf-8").read()
    p = os.path.join(dir_, "chat_template.json")
    if os.path.isfile(p):
        return json.load(open(p, encoding="utf-8"))["chat_template"]
    p = os.path.join(dir_, "tokenizer_config.json")
    tpl = json.load(open(p, encoding="utf-8"))["chat_template"]
    if isinstance(tpl, list):
        tpl = {t["name"]: t["template"] for t in tpl}["default"]
    return tpl


def special_tokens(dir_):
    p = os.path.join(dir_, "tokenizer_config.json")
    if not os.path.isfile(p):
        return {}
    cfg = json.load(open(p, encoding="utf-8"))
    out = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        v = cfg.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


def load_tokenizer(dir_):
    """The class tokenizer_config.json names. AutoTokenizer fails on llava-interleave-qwen-7b
    (it resolves through the llava config and finds no converter), while the named
    Qwen2Tokenizer builds from vocab.json + merges.txt."""
    cfg = json.load(open(os.path.join(dir_, "tokenizer_config.json"), encoding="utf-8"))
    cls = getattr(transformers, cfg.get("tokenizer_class") or "", None) or AutoTokenizer
    return cls.from_pretrained(dir_)


def to_messages(turns, string_content=None):
    msgs = []
    for t in turns:
        if string_content is not None:
            pieces = [p["text"] if p["type"] == "text" else string_content[p["type"]] for p in t["parts"]]
            msgs.append({"role": t["role"], "content": "".join(pieces)})
            continue
        content = []
        for p in t["parts"]:
            if p["type"] == "text":
                content.append({"type": "text", "text": p["text"]})
            else:
                content.append({"type": p["type"]})
        msgs.append({"role": t["role"], "content": content})
    return msgs


def render(case, tok, messages, add_generation_prompt):
    tpl = case["template"] if case["template"] is not None else discover(case["template_dir"])
    if tok is not None:
        return tok.apply_chat_template(
            messages, chat_template=tpl, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=tpl,
        add_generation_prompt=add_generation_prompt,
        **special_tokens(case["template_dir"]),
    )
    return rendered[0]


def expand(ids, labels, tok, case):
    image_id = tok.convert_tokens_to_ids(case["image_token"]) if case.get("image_token") else None
    video_id = tok.convert_tokens_to_ids(case["video_token"]) if case.get("video_token") else None
    images, videos = list(case["images"]), list(case["videos"])
    out_ids, out_labels = [], []
    for i, l in zip(ids, labels):
        if i == image_id:
            k = images.pop(0)
            out_ids += [i] * k
            out_labels += [-100] * k
        elif i == video_id:
            k = videos.pop(0)
            out_ids += [i] * k
            out_labels += [-100] * k
        else:
            out_ids.append(i)
            out_labels.append(l)
    assert not images and not videos, f"{case['name']}: unused media counts"
    return out_ids, out_labels


def content_spans(rendered, turns):
    """Assistant text parts found by searching each in order (no sentinels)."""
    spans, cursor = [], 0
    for t in turns:
        if t["role"] != "assistant":
            continue
        for p in t["parts"]:
            if p["type"] != "text":
                continue
            a = rendered.find(p["text"], cursor)
            assert a >= 0, "assistant text not found"
            spans.append((a, a + len(p["text"])))
            cursor = a + len(p["text"])
    return spans


def tokenize(tok, case, turns, agp):
    """Rendered text, ids and char offsets. Split points are assistant content starts and the
    end of each assistant turn's generation prompt; the text is split at those a token
    straddles, if the pieces decode to the same text (the rule of template.rs)."""
    rendered = render(case, tok, to_messages(turns, case.get("string_content")), agp)
    spans = content_spans(rendered, turns)
    bounds = [a for a, _ in spans]
    for i, t in enumerate(turns):
        if t["role"] == "assistant":
            p = render(case, tok, to_messages(turns[:i], case.get("string_content")), True)
            if rendered.startswith(p):
                bounds.append(len(p))

    def enc(text, base):
        e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return e["input_ids"], [(s + base, t + base) for s, t in e["offset_mapping"]]

    ids, offs = enc(rendered, 0)
    cut = sorted({b for b in bounds if any(s < b < e for s, e in offs)})
    if cut:
        pids, poffs, prev = [], [], 0
        for b in cut + [len(rendered)]:
            if b > prev:
                i, o = enc(rendered[prev:b], prev)
                pids += i
                poffs += o
                prev = b
        if tok.decode(pids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False):
            ids, offs = pids, poffs
    return rendered, ids, offs, spans


def label(ids, offs, spans, tok, case, label_all):
    media = {tok.convert_tokens_to_ids(case[k]) for k in ("image_token", "video_token") if case.get(k)}
    added = set(tok.added_tokens_decoder.keys())
    n = len(ids)
    if label_all:
        return [-100 if i in media else i for i in ids]
    labels = [-100] * n
    for a, b in spans:
        last = None
        for i, (s, e) in enumerate(offs):
            if s < b and e > a and e > s and ids[i] not in media:
                labels[i] = ids[i]
                last = i
        nxt = last + 1 if last is not None else next((i for i, (s, _) in enumerate(offs) if s >= b), n)
        while nxt < n and ids[nxt] in added and ids[nxt] not in media:
            labels[nxt] = ids[nxt]
            nxt += 1
    return labels


def main():
    inp = json.load(open(sys.argv[1], encoding="utf-8"))
    out = {"tokenizers": {}, "cases": {}}
    toks = {}
    for name, dir_ in inp["tokenizers"].items():
        tok = load_tokenizer(dir_)
        dest = os.path.join(inp["out_dir"], name)
        tok.save_pretrained(dest)
        toks[name] = tok
        out["tokenizers"][name] = os.path.join(dest, "tokenizer.json")
    for case in inp["cases"]:
        tok = toks.get(case["tokenizer"]) if case["tokenizer"] else None
        messages = to_messages(case["turns"], case.get("string_content"))
        prompt_turns = case["turns"][:-1] if case["turns"][-1]["role"] == "assistant" else case["turns"]
        try:
            res = {
                "rendered": render(case, tok, messages, False),
                "prompt_rendered": render(case, tok, to_messages(prompt_turns, case.get("string_content")), True),
            }
        except Exception as e:  # reported, and the Rust test decides what that means
            out["cases"][case["name"]] = {"error": f"{type(e).__name__}: {e}"}
            continue
        if tok is not None:
            _, ids, offs, spans = tokenize(tok, case, case["turns"], False)
            whole = tok(res["rendered"], add_special_tokens=False)["input_ids"]
            res["whole_ids"], _ = expand(whole, [-100] * len(whole), tok, case)
            res["ids"], res["labels"] = expand(ids, label(ids, offs, spans, tok, case, False), tok, case)
            _, res["labels_all"] = expand(ids, label(ids, offs, spans, tok, case, True), tok, case)
            _, pids, _, _ = tokenize(tok, case, prompt_turns, True)
            n_img = sum(p["type"] == "image" for t in prompt_turns for p in t["parts"])
            n_vid = sum(p["type"] == "video" for t in prompt_turns for p in t["parts"])
            pcase = dict(case, images=case["images"][:n_img], videos=case["videos"][:n_vid])
            res["prompt_ids"], _ = expand(pids, [-100] * len(pids), tok, pcase)
        out["cases"][case["name"]] = res
    json.dump(out, open(sys.argv[2], "w", encoding="utf-8"), ensure_ascii=False)


if __name__ == "__main__":
    main()
